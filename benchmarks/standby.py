"""Warm standby: how fast an engine parks and wakes, against the bus and a cold start.

One run, one model (random weights of a real shape: ``llama-3-8b`` in bf16 is about 16 GB):

1. the reference: a pinned host-to-device copy of as many bytes as the weights, timed here;
2. load the engine with standby on (a pinned host copy of its weights) and time the first token
   of a request on a never-parked engine;
3. park / wake cycles: the time to park, to wake (and the wake's GB/s against the reference),
   the device memory the process holds before and after a park as the driver sees it (NVML,
   asked from another process), and the first token of a request that arrives while parked
   (its wake included); on the GPU also that the decode graphs captured at load still replay;
4. cold start: a new process imports, initializes the device, loads the weights from disk with
   the model's files evicted from the page cache, and produces its first token;
5. what is not released on park (the graphs' memory pool, the CUDA context) and, for the
   record, what recapturing the graphs takes (the price of releasing their pool too).

Prints one table and writes it as Markdown (``--out``). Runs on the CPU too (``--device cpu
--shape tiny``) to check the script end to end; the numbers then mean little.

    python benchmarks/standby.py --shape llama-3-8b --model-cache /tmp/berth-models \\
        --out benchmarks/results/standby-h200.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from berth.runtime.engine import Engine, EngineConfig, SamplingParams

PROMPT = [(37 * i) % 1000 + 5 for i in range(128)]  # token ids: a 128-token prompt
FIRST = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bus_reference(nbytes: int, device: torch.device) -> float:
    """GB/s of one pinned host-to-device copy of ``nbytes`` (best of three)."""
    pin = device.type == "cuda"
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    host.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(host, non_blocking=True)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    del dst, host
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return nbytes / best / 1e9


def first_token_s(engine: Engine, wake: bool = False) -> float:
    """Seconds from a request's arrival to its first token (waking the engine first if asked)."""
    start = time.perf_counter()
    if wake:
        engine.wake()
    for out in engine.stream(PROMPT, FIRST):
        if out.new_token_ids:
            break
    return time.perf_counter() - start


def held_by(pid: int, device: torch.device) -> int | None:
    """Device bytes process ``pid`` holds, asked of the driver by another process (NVML)."""
    if device.type != "cuda":
        return None
    code = (
        "import sys; from berth.runtime.engine import nvml; "
        "print(nvml.process_bytes(int(sys.argv[1]), index=int(sys.argv[2])))"
    )
    index = device.index or 0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run(
        [sys.executable, "-c", code, str(pid), str(index)],
        capture_output=True, text=True, env=env, check=True,
    ).stdout.strip()  # fmt: skip
    return None if out == "None" else int(out)


def drop_page_cache(model_dir: Path) -> None:
    """Evict the model's files from the page cache (only theirs: the machine may be shared)."""
    os.sync()
    for file in model_dir.iterdir():
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold_child(model: str, device: str, dtype: str) -> None:
    """The cold start, in a fresh process: prints JSON with its phases' seconds."""
    t0 = time.perf_counter()
    engine = Engine(EngineConfig(model=model, device=device, dtype=dtype, max_num_seqs=8))
    loaded = time.perf_counter()
    first = first_token_s(engine)
    print(json.dumps({"load_s": loaded - t0, "first_token_s": first}))


def cold_start(model_dir: Path, device: str, dtype: str) -> tuple[float, dict[str, float]]:
    """Seconds from spawning a new process to its first token, the model's files evicted from
    the page cache (the Python and CUDA libraries may still be cached, as on a warm node)."""
    drop_page_cache(model_dir)
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--cold-child", str(model_dir), "--device", device,
         "--dtype", dtype],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    total = time.perf_counter() - start
    return total, json.loads(out.strip().splitlines()[-1])


def make_model(shape: str, cache: Path, dtype: str, device: str) -> Path:
    from berth.runtime.engine.testmodels import make_model as make

    out = cache / f"{shape}-{dtype}"
    if not (out / "config.json").exists():
        make(shape, out, dtype=dtype, device=device)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="[default: bfloat16 on cuda, float32 else]")
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument(
        "--kv-cache-gib", type=float, default=None,
        help="the KV pool a wake maps back, a co-located tenant's share rather than the whole "
        "GPU [default: 8 on cuda, 1/16 else]",
    )  # fmt: skip
    parser.add_argument("--model-cache", default="/tmp/berth-models")
    parser.add_argument("--out", help="Markdown results file")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold start")
    parser.add_argument("--no-recapture", action="store_true", help="skip the recapture timing")
    parser.add_argument("--cold-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    kv_gib = args.kv_cache_gib if args.kv_cache_gib is not None else (8.0 if gpu else 1 / 16)
    if args.cold_child:
        cold_child(args.cold_child, args.device, dtype)
        return

    model_dir = make_model(args.shape, Path(args.model_cache), dtype, args.device)
    t = time.perf_counter()
    engine = Engine(
        EngineConfig(model=str(model_dir), device=args.device, dtype=dtype, max_num_seqs=8,
                     kv_cache_bytes=int(kv_gib * 2**30), standby=True)
    )  # fmt: skip
    load_s = time.perf_counter() - t
    runner = engine.runner
    device = runner.device
    weights = runner.weight_arena.flat.numel()
    kv_bytes = runner.arena.mapped_bytes
    bus = bus_reference(weights, device)
    first_token_s(engine)  # warm-up: the first request's one-time costs
    never_parked = statistics.median(first_token_s(engine) for _ in range(5))

    pid = os.getpid()
    before = held_by(pid, device)
    parks, wakes, after_wake, held_parked = [], [], [], []
    replays = runner.num_graph_replays
    for i in range(args.cycles):
        _sync(device)
        t = time.perf_counter()
        engine.park()
        _sync(device)
        parks.append(time.perf_counter() - t)
        if i == 0:
            held_parked.append(held_by(pid, device))
        if i % 2 == 0:
            t = time.perf_counter()
            engine.wake()
            wakes.append(time.perf_counter() - t)
            first_token_s(engine)
        else:
            after_wake.append(first_token_s(engine, wake=True))
    decode = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    engine.generate([PROMPT], decode)
    graphs_replayed = runner.num_graph_replays > replays

    retained = torch.cuda.memory_reserved(device) if device.type == "cuda" else 0
    live = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    recapture_s = None
    if runner.graphs and not args.no_recapture:
        t = time.perf_counter()
        runner._capture_graphs(engine.config)
        recapture_s = time.perf_counter() - t

    cold = None
    if not args.no_cold:
        cold = cold_start(model_dir, args.device, dtype)

    wake_s = statistics.median(wakes)
    wake_gbs = weights / wake_s / 1e9
    ttft_wake = statistics.median(after_wake) if after_wake else float("nan")
    rows: list[tuple[str, str]] = [
        ("model", f"{args.shape} {dtype}, weights {weights / 1e9:.2f} GB, KV pool "
                  f"{kv_bytes / 2**30:.2f} GiB, {device}"),
        ("engine load (in process, standby on: pins the host copy)", f"{load_s:.2f} s"),
        ("reference: pinned host-to-device copy of the weights' size", f"{bus:.1f} GB/s"),
        (f"park (median of {len(parks)})", f"{statistics.median(parks) * 1e3:.1f} ms"),
        (f"wake: map + copy weights + map KV (median of {len(wakes)})", f"{wake_s * 1e3:.1f} ms"),
        ("wake bandwidth (weights / whole wake, KV mapping included)",
         f"{wake_gbs:.1f} GB/s ({wake_gbs / bus:.0%} of the reference)"),
        ("first token, never parked (median of 5)", f"{never_parked * 1e3:.1f} ms"),
        ("first token of a request arriving while parked (wake included)", f"{ttft_wake * 1e3:.1f} ms"),
        ("decode graphs captured at load replayed after wakes", str(graphs_replayed)),
    ]  # fmt: skip
    if before is not None:
        parked = held_parked[0] or 0
        returned = before - parked
        rows += [
            ("device memory held before park (NVML, another process)", f"{before / 2**30:.2f} GiB"),
            ("device memory held while parked", f"{parked / 2**30:.2f} GiB"),
            ("returned to the driver on park", f"{returned / 2**30:.2f} GiB ({returned / before:.1%})"),
            ("kept while parked: torch allocator (graph pool, staging)", f"{retained / 2**30:.3f} GiB"),
            ("  of which live tensors", f"{live / 2**30:.3f} GiB"),
        ]  # fmt: skip
    if recapture_s is not None:
        rows.append(("recapturing the decode and prefill graphs (if their pool were freed)", f"{recapture_s:.2f} s"))  # fmt: skip
    if cold is not None:
        total, phases = cold
        rows += [
            ("cold start to first token (new process, model files not cached)", f"{total:.2f} s"),
            ("  of which engine load / first token", f"{phases['load_s']:.2f} s / {phases['first_token_s'] * 1e3:.1f} ms"),
            ("cold start / first token after a wake", f"{total / ttft_wake:.0f}x"),
        ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    print(f"{'measure':{width}}  value")
    for key, value in rows:
        print(f"{key:{width}}  {value}")
    if args.out:
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        versions = f"torch {torch.__version__}, Python {sys.version.split()[0]}"
        lines = [f"# Warm standby: park and wake on {gpu}", "",
                 f"{when}, {versions}; `benchmarks/standby.py --shape {args.shape}`.", "",
                 "| measure | value |", "| --- | --- |"]  # fmt: skip
        lines += [f"| {k} | {v} |" for k, v in rows]
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
