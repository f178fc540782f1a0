"""Engine decode benchmark on one GPU, against Hugging Face ``generate`` and the decode roofline.

For each concurrency (1, 16, 64, 256 by default) it submits that many random 512-token prompts
asking for 256 tokens each (greedy, ignore_eos) and records every step. Reported per
concurrency: output tokens/s (end to end), the median decode-step time at full batch, the
median inter-token latency seen by requests, the host (CPU) time per decode step, and the
decode roofline: (weight bytes + KV bytes read that step) / HBM read bandwidth measured in this
run; the end-to-end ideal (prompts prefilled at the bf16 matmul rate measured in the run, then
the decode steps at their roofline) and the fraction of it reached; steady decode steps beside
a floor (the step's matmuls alone through cuBLAS, plus the KV read at the measured bandwidth).
Then Hugging Face ``generate`` runs the same model and batch (a shorter output: its step
time does not depend on the step) and time to first token is measured on an idle engine.
The heap is frozen after the engine starts, as the engine process does (``heap.py``), so a
full garbage collection does not walk the start-up objects in the middle of a run.

    PYTHONPATH=. python benchmarks/engine.py --out $OUT        # on the GPU machine

Writes ``engine-<gpu>.md`` (the table) and ``engine-<gpu>.json`` (all numbers) to --out.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import io
import itertools
import json
import os
import pstats
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from berth.kernels.checks import programmatic_launch
from berth.runtime.engine import Engine, EngineConfig, SamplingParams, blas_choice, model_runner
from berth.runtime.engine.config import DECODE_BLAS
from berth.runtime.engine.model import AttentionOps
from berth.runtime.engine.model_config import ModelConfig
from berth.runtime.engine.scheduler import padded_size
from berth.runtime.engine.testmodels import make_model
from berth.runtime.server.heap import freeze_startup_heap

GREEDY = SamplingParams(temperature=0.0)


def measure_bandwidth(gib: int = 4) -> dict[str, float]:
    """HBM read bandwidth (a reduction over a large tensor) and copy bandwidth (read+write)."""
    n = (gib << 30) // 2
    x = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    results = {}
    for name, fn, nbytes in (
        ("read", lambda: x.sum(dtype=torch.float32), x.numel() * 2),
        ("copy", lambda: y.copy_(x), x.numel() * 4),
    ):
        fn()
        times = []
        for _ in range(10):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        results[name] = nbytes / statistics.median(times)
    torch.cuda.empty_cache()
    return results


def measure_matmul_rate(n: int = 8192, repeats: int = 10) -> float:
    """The device's bf16 matmul rate (FLOP/s) on one n x n x n product, cuBLAS: what prefill's
    matmuls can reach at best, for the end-to-end ideal."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return 2 * n**3 / statistics.median(times)


def prefill_flops(model: torch.nn.Module, mc: ModelConfig, prompt_len: int) -> float:
    """FLOPs to prefill one prompt: every linear of the decoder layers per token, the LM head
    on the last token only, and causal attention (QK^T and PV over half the prompt on
    average)."""
    per_token = sum(
        2 * m.in_features * m.out_features
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name != "lm_head"
    )
    head = 2 * mc.hidden_size * mc.vocab_size
    attention = 4 * mc.num_layers * mc.num_heads * mc.head_dim * prompt_len * (prompt_len + 1) / 2
    return prompt_len * per_token + head + attention


def time_linears(model: torch.nn.Module, batch: int, repeats: int = 11) -> dict[str, float]:
    """Every linear layer of ``model`` applied once to ``batch`` rows, in model order, as one
    CUDA graph: what cuBLAS takes for a decode step's matmuls alone (median ms) and the rate
    it reaches (TFLOP/s). At batch 256 the weights' bytes no longer bound these matmuls; their
    FLOPs do, so a bytes-only roofline understates the step, and this is the floor beside it."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    flops = sum(2 * batch * m.in_features * m.out_features for m in linears)
    ms = blas_choice.time_matmuls([m.weight for m in linears], batch, replays=repeats)
    return {"linears_ms": ms, "linears_tflops": flops / (ms * 1e-3) / 1e12}


def run_engine(
    engine: Engine,
    concurrency: int,
    prompt_len: int,
    output_len: int,
    rng: random.Random,
    sampling: SamplingParams = GREEDY,
    rounds: int = 1,
) -> dict[str, Any]:
    """Submit ``concurrency`` requests at once and record every step until all finish. With
    ``rounds`` above 1, a closed loop: each request that finishes is replaced by a new one
    until ``rounds * concurrency`` have been submitted, so arrivals spread out over the steps
    (the way a serving benchmark holds a concurrency, vLLM's ``--max-concurrency``) instead
    of all prompts landing in the first steps."""
    vocab = engine.model_config.vocab_size
    params = dataclasses.replace(sampling, max_tokens=output_len, ignore_eos=True)
    submitted = 0
    arrived: dict[str, float] = {}  # a request's submission, from which its TTFT counts

    def submit() -> None:
        nonlocal submitted
        prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
        request_id = f"c{concurrency}-{submitted}"
        arrived[request_id] = time.perf_counter()
        engine.add_request(request_id, prompt, params)
        submitted += 1

    for _ in range(concurrency):
        submit()
    token_times: dict[str, list[float]] = {}
    decode_steps: list[tuple[float, float, int]] = []  # (wall, host, kv tokens read)
    calls: list[dict[str, Any]] = []  # every step call: what it waited for, what it launched
    gc_clock = GcClock()
    launched = (0, 0)
    retries = allocator_retries(engine)
    start = time.perf_counter()
    arrived = dict.fromkeys(arrived, start)  # the first ones count from the run's start
    last_end = start  # an output's gap, as ITL counts it, runs from the previous call's end
    while engine.has_unfinished():
        running = list(engine.scheduler.running)
        gc_clock.seconds = 0.0
        t0 = time.perf_counter()
        outputs = engine.step()
        t1 = time.perf_counter()
        calls.append(
            {
                "gap_ms": 1e3 * (t1 - last_end),
                "wall_ms": 1e3 * (t1 - t0),
                "host_ms": 1e3 * engine.last_step_host_seconds,
                "gc_ms": 1e3 * gc_clock.seconds,
                "waited_for": launched,  # the batch the previous call launched: (seqs, tokens)
                "launched": engine.last_step_batch,
                "outputs": len(outputs),
            }
        )
        waited_for, launched, last_end = launched, engine.last_step_batch, t1
        for out in outputs:
            token_times.setdefault(out.request_id, []).append(t1)
            if out.finished and submitted < rounds * concurrency:
                submit()
        decoding = (
            len(outputs) == concurrency
            and waited_for[0] == waited_for[1]  # the call waited for a decode batch
            and all(s.num_computed_tokens >= s.num_prompt_tokens for s in running)
            and len(running) == concurrency
        )
        if decoding:
            kv_tokens = sum(s.num_computed_tokens for s in running)
            decode_steps.append((t1 - t0, engine.last_step_host_seconds, kv_tokens))
    total = time.perf_counter() - start
    gc_clock.close()
    if not decode_steps:
        raise SystemExit(
            f"concurrency {concurrency}: no step decoded all {concurrency} requests at once (the "
            f"first ones finish before the last prompt is in): the roofline and the ideal need "
            f"such steps; raise --output-len above {output_len}"
        )
    itl = [b - a for times in token_times.values() for a, b in itertools.pairwise(times)]
    ttft = sorted(times[0] - arrived[rid] for rid, times in token_times.items())
    itl_p99 = sorted(itl)[int(0.99 * len(itl))]
    return {
        "slow_calls": slow_calls(calls, 1e3 * itl_p99),
        # cudaMalloc failures that made torch empty its cache and synchronize the device
        "allocator_retries": allocator_retries(engine) - retries,
        "concurrency": concurrency,
        "rounds": rounds,
        "total_s": total,
        "output_tokens": submitted * output_len,
        "tokens_per_s": submitted * output_len / total,
        "decode_steps": len(decode_steps),
        "step_ms": 1e3 * statistics.median(w for w, _, _ in decode_steps),
        "host_ms": 1e3 * statistics.median(h for _, h, _ in decode_steps),
        "host_ms_p90": 1e3 * sorted(h for _, h, _ in decode_steps)[int(0.9 * len(decode_steps))],
        "kv_tokens_mean": statistics.mean(k for _, _, k in decode_steps),
        "itl_ms": 1e3 * statistics.median(itl),
        "itl_ms_p99": 1e3 * itl_p99,
        "ttft_ms": 1e3 * statistics.median(ttft),
        "ttft_ms_p99": 1e3 * ttft[int(0.99 * len(ttft))],
    }


def allocator_retries(engine: Engine) -> int:
    """Times torch's CUDA allocator found no free memory, emptied its cache (which waits for
    the device) and tried again; 0 on the CPU."""
    device = engine.runner.device
    if device.type != "cuda":
        return 0
    return int(torch.cuda.memory_stats(device).get("num_alloc_retries", 0))


class GcClock:
    """Seconds the garbage collector ran since ``seconds`` was last reset (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0
        gc.callbacks.append(self._tick)

    def _tick(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start

    def close(self) -> None:
        gc.callbacks.remove(self._tick)


def slow_calls(calls: list[dict[str, Any]], itl_p99_ms: float) -> dict[str, Any]:
    """What the step calls at or above the ITL p99 were: an output's gap is the time from the
    end of the call before to the end of its own, which is that call's host work plus its wait
    for the batch the call before launched (a decode batch, or one carrying prompt tokens), so
    this tells what makes the tail: a kind of batch, the host, or the garbage collector. Also
    the 8 slowest calls as they were."""
    tail = [c for c in calls if c["gap_ms"] >= itl_p99_ms and c["outputs"]]
    kinds: dict[str, int] = {}
    for c in tail:
        seqs, tokens = c["waited_for"]
        kind = "decode" if tokens == seqs else "with prompt tokens"
        kind += ", gc ran" if c["gc_ms"] >= 1.0 else ""
        kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "itl_p99_ms": itl_p99_ms,
        "calls": len(calls),
        "at_or_above_p99": len(tail),
        "kinds": kinds,
        "host_ms_median_in_tail": statistics.median(c["host_ms"] for c in tail) if tail else 0.0,
        "slowest": sorted(calls, key=lambda c: -c["gap_ms"])[:8],
    }


def steady_decode(
    engine: Engine,
    concurrency: int,
    prompt_len: int,
    rng: random.Random,
    steps: int = 32,
    host_profile: Path | None = None,
    sampling: SamplingParams = GREEDY,
) -> dict[str, Any]:
    """Decode steps with all ``concurrency`` sequences decoding and nothing else in the step.

    ``run_engine`` submits everything at once, so at 256 the first requests finish before the
    last prompts are in: its full-batch decode steps are a handful, at the tail. Here the
    requests run until every one decodes, then ``steps`` steps are timed (wall, host CPU,
    KV tokens read), and the requests are aborted. With ``host_profile`` those steps are
    cProfiled (host side, sorted by own time) into that file; their times then include
    cProfile's overhead."""
    vocab = engine.model_config.vocab_size
    # The prompts go in a capped number of tokens per step beside the decodes, so the first
    # requests must outlive the steps that take the last prompt in, or the batch never fills.
    per_step = (
        engine.config.max_prefill_tokens_while_decoding or engine.config.max_num_batched_tokens
    )
    fill_steps = -(-concurrency * prompt_len // per_step)
    params = dataclasses.replace(sampling, max_tokens=fill_steps + steps + 64, ignore_eos=True)
    ids = [f"steady-{concurrency}-{i}" for i in range(concurrency)]
    for rid in ids:
        engine.add_request(rid, [rng.randrange(vocab) for _ in range(prompt_len)], params)
    ready = 0  # consecutive steps in which every request decoded and got a token
    while ready < 2:
        if not engine.has_unfinished():
            raise RuntimeError(f"steady decode: the {concurrency} requests never all decoded")
        running = list(engine.scheduler.running)
        outputs = engine.step()
        full = len(running) == concurrency and len(outputs) == concurrency
        ready = ready + 1 if full and all(s.num_computed_tokens >= s.num_prompt_tokens
                                          for s in running) else 0  # fmt: skip
    rows: list[tuple[float, float, int]] = []
    profiler = cProfile.Profile() if host_profile is not None else None
    for _ in range(steps):
        kv_tokens = sum(s.num_computed_tokens for s in engine.scheduler.running)
        t0 = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        engine.step()
        if profiler is not None:
            profiler.disable()
        rows.append((time.perf_counter() - t0, engine.last_step_host_seconds, kv_tokens))
    if profiler is not None and host_profile is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(40)
        host_profile.write_text(text.getvalue())
    launch = graph_launch_cost(engine, concurrency)
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished():
        engine.step()
    walls, hosts = sorted(w for w, _, _ in rows), sorted(h for _, h, _ in rows)
    return {
        "steps": steps,
        "step_ms": 1e3 * statistics.median(walls),
        "host_ms": 1e3 * statistics.median(hosts),
        "host_ms_p90": 1e3 * hosts[int(0.9 * len(hosts))],
        "kv_tokens_mean": statistics.mean(k for _, _, k in rows),
        **launch,
    }


def graph_launch_cost(engine: Engine, concurrency: int, repeats: int = 20) -> dict[str, float]:
    """Host microseconds of one decode graph's ``replay`` (one ``cudaGraphLaunch``) at this
    batch: on an idle GPU, and right behind a replay still running, as the engine launches a
    step while the one before runs. Tells the launch's own CPU cost from back-pressure. The
    replays rewrite the last step's KV slots, so the requests must be aborted after."""
    runner = engine.runner
    size = padded_size(runner.graph_sizes, concurrency)
    if not size or runner.device.type != "cuda":
        return {}
    graph = runner.graphs[size]
    idle, queued = [], []
    for _ in range(repeats):
        torch.cuda.synchronize(runner.device)
        t0 = time.perf_counter()
        graph.replay()
        t1 = time.perf_counter()
        graph.replay()
        t2 = time.perf_counter()
        idle.append(t1 - t0)
        queued.append(t2 - t1)
    torch.cuda.synchronize(runner.device)
    return {
        "graph_launch_idle_us": 1e6 * statistics.median(idle),
        "graph_launch_queued_us": 1e6 * statistics.median(queued),
    }


def time_to_first_token(
    engine: Engine, prompt_len: int, rng: random.Random, repeats: int = 5
) -> float:
    vocab = engine.model_config.vocab_size
    times = []
    for i in range(repeats):
        prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
        t0 = time.perf_counter()
        engine.add_request(f"ttft-{i}", prompt, SamplingParams(max_tokens=1, temperature=0.0))
        while not engine.step():
            pass
        times.append(time.perf_counter() - t0)
        while engine.has_unfinished():
            engine.step()
    return 1e3 * statistics.median(times)


def profile_decode(engine: Engine, concurrency: int, prompt_len: int, path: Path) -> None:
    """GPU kernel time by kernel over 10 full-batch decode steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    for i in range(concurrency):
        engine.add_request(f"prof-{i}", [1 + (i * 7 + j) % 1000 for j in range(prompt_len)], params)
    while engine.scheduler.waiting or any(
        s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running
    ):
        engine.step()
    engine.step()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            engine.step()
    table = prof.key_averages().table(
        sort_by="cuda_time_total", row_limit=30, max_name_column_width=60
    )
    path.write_text(table)
    while engine.has_unfinished():
        engine.step()


def run_hf(
    model_dir: Path, concurrencies: list[int], prompt_len: int, new_tokens: int
) -> dict[int, dict[str, Any]]:
    """Hugging Face generate on the same model and batches: per-step time from two lengths."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cuda")
    results: dict[int, dict[str, Any]] = {}
    for c in concurrencies:
        ids = torch.randint(0, model.config.vocab_size, (c, prompt_len), device="cuda")
        try:
            timings = {}
            for n in (1, new_tokens):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.generate(
                    ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
                )
                torch.cuda.synchronize()
                timings[n] = time.perf_counter() - t0
            step = (timings[new_tokens] - timings[1]) / (new_tokens - 1)
            results[c] = {"step_ms": 1e3 * step, "tokens_per_s": c / step}
        except torch.OutOfMemoryError as e:
            results[c] = {"error": f"out of memory: {e}"[:120]}
        gc.collect()
        torch.cuda.empty_cache()
        print(f"HF c={c}: {results[c]}", flush=True)
    return results


def use_unfused_rope() -> None:
    """RoPE and the KV cache write as separate kernels from now on in this process (the engine
    before ``rope_write_kv_cache``): the other side of a side-by-side."""
    fused = model_runner.attention_ops

    def attention_ops(device: torch.device) -> tuple[AttentionOps, str]:
        ops, backend = fused(device)
        return dataclasses.replace(ops, rope_write_kv_cache=None), backend

    model_runner.attention_ops = attention_ops


def use_fused_norms() -> None:
    """The norm weights folded into the projections and the decode graphs' RMSNorms inside the
    skinny kernel from now on in this process (``model_runner.FUSE_NORMS``, off by default)."""
    model_runner.FUSE_NORMS = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-8b", help="test-model shape to generate")
    ap.add_argument("--model-dir", default="/tmp/berth-bench-model")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--concurrency", default="1,16,64,256")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="requests per concurrency slot: 1 submits them all at once (a burst); above 1 a "
        "closed loop replaces each finished request until this many per slot have run",
    )
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument(
        "--hf-tokens", type=int, default=17, help="generate length for the HF step time"
    )
    ap.add_argument("--kv-cache-gib", type=float, default=30.0)
    ap.add_argument("--max-prefill-tokens-while-decoding", type=int, default=512, help="0: no cap")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    ap.add_argument("--tag", default="", help="suffix of the result files' names")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192, help="per-step budget")
    ap.add_argument(
        "--max-prefill-graph-tokens", type=int, default=2048, help="0: prefill steps run eagerly"
    )
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="of the measured requests (0: greedy); above 0 they take the sampler's path",
    )
    ap.add_argument(
        "--presence-penalty",
        type=float,
        default=0.0,
        help="of the measured requests: each choice then reads its token counts (kept on "
        "the device, counted by each draw)",
    )
    ap.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="of the measured requests (1: off); it covers the prompt's ids too",
    )
    ap.add_argument(
        "--unfused-rope",
        action="store_true",
        help="RoPE and the KV cache write as separate kernels (the engine before the fused one)",
    )
    ap.add_argument(
        "--fused-norms",
        action="store_true",
        help="the decode graphs' RMSNorms inside the skinny kernel (model_runner.FUSE_NORMS)",
    )
    ap.add_argument(
        "--unfilled-steps",
        action="store_true",
        help="prompt tokens beside decodes held to the cap, not raised to fill the step's graph "
        "(the engine before Scheduler.step_sizes)",
    )
    ap.add_argument(
        "--skinny-min-gain",
        type=float,
        default=blas_choice.SKINNY_MIN_GAIN,
        help="the start-up measurement puts a kind of projection on the skinny kernel where it "
        "beats BLAS by this factor (below 1: also where it is that much slower)",
    )
    ap.add_argument(
        "--no-pdl",
        action="store_true",
        help="no programmatic dependent launch on the decode path (BERTH_PDL=0; it is on by "
        "default on Hopper or later)",
    )
    ap.add_argument(
        "--blas",
        choices=DECODE_BLAS,
        default="measured",
        help="the decode graphs' BLAS library (EngineConfig.decode_blas): measured per batch "
        "size at start-up (the default), or one for all",
    )
    ap.add_argument("--profile", default="", help="concurrencies to profile, e.g. 1,64")
    ap.add_argument(
        "--host-profile",
        default="",
        help="concurrencies whose steady decode steps are cProfiled (host side) in a second "
        "run, not the reported one, e.g. 256",
    )
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name().replace("NVIDIA ", "").split()[0].lower() + args.tag
    report: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model": args.model,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "rounds": args.rounds,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_prefill_graph_tokens": args.max_prefill_graph_tokens,
        "max_prefill_tokens_while_decoding": args.max_prefill_tokens_while_decoding,
        "kv_cache_dtype": args.kv_cache_dtype,
        "temperature": args.temperature,
        "presence_penalty": args.presence_penalty,
        "repetition_penalty": args.repetition_penalty,
    }
    sampling = SamplingParams(
        temperature=args.temperature,
        presence_penalty=args.presence_penalty,
        repetition_penalty=args.repetition_penalty,
    )

    def save() -> None:
        (out / f"engine-{gpu}.json").write_text(json.dumps(report, indent=2))

    t0 = time.perf_counter()
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").exists():
        make_model(args.model, model_dir, seed=0, dtype="bfloat16", device="cuda")
    report["make_model_s"] = time.perf_counter() - t0
    print(f"model ready in {report['make_model_s']:.1f}s", flush=True)
    bw = measure_bandwidth()
    report["hbm_read_bytes_per_s"], report["hbm_copy_bytes_per_s"] = bw["read"], bw["copy"]
    print(f"HBM read {bw['read'] / 1e12:.2f} TB/s, copy {bw['copy'] / 1e12:.2f} TB/s", flush=True)
    report["matmul_flops_per_s"] = rate = measure_matmul_rate()
    print(f"bf16 matmul {rate / 1e12:.0f} TFLOP/s", flush=True)

    concurrencies = [int(c) for c in args.concurrency.split(",")]
    report["fused_rope_kv_write"] = not args.unfused_rope
    if args.no_pdl:
        os.environ["BERTH_PDL"] = "0"  # read by the kernel launchers and the runner
    report["programmatic_launch"] = programmatic_launch(torch.device("cuda"))
    if args.unfused_rope:
        use_unfused_rope()
    report["fused_norms"] = args.fused_norms
    if args.fused_norms:
        use_fused_norms()
    report["skinny_min_gain"] = blas_choice.SKINNY_MIN_GAIN = args.skinny_min_gain
    t0 = time.perf_counter()
    engine = Engine(
        EngineConfig(
            model=str(model_dir),
            dtype="bfloat16",
            device="cuda",
            # room for one prompt of a whole step (the prefill measurement below)
            max_model_len=max(args.prompt_len + args.output_len, args.max_num_batched_tokens) + 256,
            max_num_seqs=max(concurrencies),
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_prefill_graph_tokens=args.max_prefill_graph_tokens,
            max_prefill_tokens_while_decoding=args.max_prefill_tokens_while_decoding or None,
            kv_cache_dtype=args.kv_cache_dtype,
            kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)),
            decode_blas=args.blas,
        )
    )
    report["engine_start_s"] = time.perf_counter() - t0
    report["filled_steps"] = not args.unfilled_steps
    if args.unfilled_steps:
        engine.scheduler.step_sizes = []
    report["decode_blas"] = {str(k): v for k, v in engine.runner.blas_for_size.items()}
    report["decode_skinny"] = {
        str(rows): {kind: str(config) for kind, config in configs.items()}
        for rows, configs in engine.runner.skinny_for_size.items()
    }
    freeze_startup_heap("benchmark")  # as the engine process does: no long full collections
    report["kernels"] = engine.runner.kernel_backend
    report["cuda_graphs"] = bool(engine.runner.graphs)
    report["prefill_graph_sizes"] = engine.runner.prefill_graph_sizes
    report["graph_capture_s"] = engine.runner.graph_capture_seconds
    print(f"engine up in {report['engine_start_s']:.1f}s ({report['kernels']} kernels)", flush=True)
    mc = engine.model_config
    params = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    embed = engine.runner.model.model.embed_tokens.weight
    weight_bytes = params - (0 if mc.tie_word_embeddings else embed.numel() * embed.element_size())
    report["weight_bytes_read_per_step"] = weight_bytes
    rng = random.Random(0)
    report["ttft_ms"] = time_to_first_token(engine, args.prompt_len, rng)
    print(f"TTFT {report['ttft_ms']:.1f} ms", flush=True)
    chunk = engine.config.max_num_batched_tokens
    if chunk <= 8192:  # the landed engine's 8,192-token steps take too long to be worth it
        # A prompt of one whole step on an idle engine: the step's FLOPs over its time (to
        # the first token), against the matmul rate measured above.
        ms = time_to_first_token(engine, chunk, rng)
        flops = prefill_flops(engine.runner.model, mc, chunk)
        report["prefill_chunk"] = {"tokens": chunk, "ms": ms, "flops_per_s": flops / ms * 1e3,
                                   "of_matmul": flops / ms * 1e3 / rate}  # fmt: skip
        print(f"prefill of {chunk} tokens: {ms:.1f} ms, {flops / ms / 1e9:.0f} TFLOP/s, "
              f"{report['prefill_chunk']['of_matmul']:.0%} of the matmul rate", flush=True)  # fmt: skip
    report["engine"] = []
    host_profiled = {int(c) for c in args.host_profile.split(",") if c}
    for c in concurrencies:
        r = run_engine(engine, c, args.prompt_len, args.output_len, rng, sampling, args.rounds)
        kv_bytes = r["kv_tokens_mean"] * engine.runner.block_bytes / engine.config.block_size
        r["roofline_ms"] = 1e3 * (weight_bytes + kv_bytes) / bw["read"]
        r["vs_roofline"] = r["step_ms"] / r["roofline_ms"]
        # The ideal: every prompt prefilled at the measured matmul rate, then the
        # decode steps at their roofline; what fraction of its rate the run reached (per
        # round: a closed loop's rounds each add as many prompts and steps).
        ideal_s = (
            c * prefill_flops(engine.runner.model, mc, args.prompt_len) / rate
            + args.output_len * r["roofline_ms"] / 1e3
        )
        r["ideal_tokens_per_s"] = c * args.output_len / ideal_s
        r["of_ideal"] = r["tokens_per_s"] / r["ideal_tokens_per_s"]
        steady = steady_decode(engine, c, args.prompt_len, rng, sampling=sampling)
        if c in host_profiled:  # a second, profiled run: its timings are not reported
            path = out / f"host-profile-{c}{args.tag}.txt"
            steady_decode(engine, c, args.prompt_len, rng, host_profile=path, sampling=sampling)
        kv_bytes = steady["kv_tokens_mean"] * engine.runner.block_bytes / engine.config.block_size
        steady["roofline_ms"] = 1e3 * (weight_bytes + kv_bytes) / bw["read"]
        steady["vs_roofline"] = steady["step_ms"] / steady["roofline_ms"]
        steady.update(time_linears(engine.runner.model, c))
        steady["kv_ms"] = 1e3 * kv_bytes / bw["read"]
        steady["floor_ms"] = steady["linears_ms"] + steady["kv_ms"]
        r["steady"] = steady
        report["engine"].append(r)
        save()
        print(json.dumps(r), flush=True)
    for c in [int(c) for c in args.profile.split(",") if c]:
        profile_decode(engine, c, args.prompt_len, out / f"profile-decode-{c}{args.tag}.txt")
    gc.unfreeze()  # the engine's objects become collectable again, its memory returns
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    report["hf"] = (
        {} if args.skip_hf else run_hf(model_dir, concurrencies, args.prompt_len, args.hf_tokens)
    )
    table = render(report)
    (out / f"engine-{gpu}.md").write_text(table)
    save()
    print(table)


def render(report: dict[str, Any]) -> str:
    lines = [
        f"# Engine decode benchmark: {report['model']} (random weights, bf16) on {report['gpu']}",
        "",
        f"{report['prompt_len']}-token prompts, {report['output_len']} output tokens, "
        f"{'temperature ' + str(report['temperature']) if report.get('temperature') else 'greedy'}, "
        f"{'presence penalty ' + str(report['presence_penalty']) + ', ' if report.get('presence_penalty') else ''}"
        f"{'repetition penalty ' + str(report['repetition_penalty']) + ', ' if report.get('repetition_penalty', 1.0) != 1.0 else ''}"
        f"ignore_eos; {report['kernels']} kernels, CUDA graphs {'on' if report['cuda_graphs'] else 'off'} "
        f"(prefill/mixed steps of up to {report['max_prefill_graph_tokens']} tokens as graphs; "
        f"capture {report['graph_capture_s']:.1f} s); step budget {report['max_num_batched_tokens']} tokens, "
        f"of them prompt tokens while decoding: {report['max_prefill_tokens_while_decoding'] or 'no cap'}; "
        f"KV cache {report['kv_cache_dtype']}; "
        f"torch {report['torch']}. HBM read bandwidth measured in this run: "
        f"{report['hbm_read_bytes_per_s'] / 1e12:.2f} TB/s (copy {report['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s). "
        f"Roofline = (weight bytes read per step {report['weight_bytes_read_per_step'] / 1e9:.2f} GB + KV bytes "
        "read per step, averaged over the full-batch decode steps) / read bandwidth.",
        "",
        f"Time to first token, 512-token prompt, idle engine: **{report['ttft_ms']:.1f} ms** (median of 5).",
        "",
    ]
    rounds = report.get("rounds", 1)
    if rounds > 1:
        lines += [
            f"End to end as a closed loop: each concurrency slot ran {rounds} requests one after "
            "another (a finished request replaced at once), not one burst.",
            "",
        ]
    if "prefill_chunk" in report:
        p = report["prefill_chunk"]
        lines += [
            f"Prefill of one {p['tokens']}-token prompt (a whole step), idle engine, to its first "
            f"token: {p['ms']:.1f} ms, **{p['flops_per_s'] / 1e12:.0f} TFLOP/s, "
            f"{p['of_matmul']:.0%} of the bf16 matmul rate** measured in this run (median of 5).",
            "",
        ]
    lines += [
        "| concurrency | output tok/s | of the ideal | decode step (ms) | roofline (ms) | step / roofline | ITL median / p99 (ms) | TTFT median / p99 (ms) | host CPU per step median / p90 (ms) | HF generate step (ms) | HF tok/s (decode) | speed-up vs HF |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["engine"]:
        hf = report.get("hf", {}).get(r["concurrency"], {})
        if "step_ms" in hf:
            hf_cells = [
                f"{hf['step_ms']:.1f}",
                f"{hf['tokens_per_s']:.0f}",
                f"{hf['step_ms'] / r['step_ms']:.1f}x",
            ]
        else:
            hf_cells = [hf.get("error", "n/a"), "n/a", "n/a"]
        cells = [
            str(r["concurrency"]),
            f"{r['tokens_per_s']:.0f}",
            f"{r['of_ideal']:.0%} of {r['ideal_tokens_per_s']:.0f}" if "of_ideal" in r else "n/a",
            f"{r['step_ms']:.2f}",
            f"{r['roofline_ms']:.2f}",
            f"{r['vs_roofline']:.2f}x",
            f"{r['itl_ms']:.2f} / {r['itl_ms_p99']:.2f}",
            f"{r['ttft_ms']:.0f} / {r['ttft_ms_p99']:.0f}",
            f"{r['host_ms']:.2f} / {r['host_ms_p90']:.2f}",
            *hf_cells,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Output tok/s is end to end (all requests submitted at once; prefill included). The ideal "
        "prefills every prompt at the bf16 matmul rate measured in this run "
        f"({report.get('matmul_flops_per_s', float('nan')) / 1e12:.0f} TFLOP/s, one 8192^3 "
        "product; linears, LM head on the last token, causal attention), then runs the decode "
        "steps at their roofline. The decode "
        "step is the median wall time of steps in which every request decodes (full batch). "
        "Host CPU per step is the step's wall time minus the wait for the device "
        "(scheduling, input preparation, sampling, detokenization, outputs). HF generate's step "
        "time is (time for N tokens - time for 1 token) / (N - 1) on the same model and batch.",
        "",
    ]
    steady = [r for r in report["engine"] if "steady" in r]
    if steady:
        lines += [
            "Steady decode: every sequence decoding, nothing else in the step (the requests run "
            "until all of them decode, then 32 steps are timed; above, at high concurrency the "
            "first requests finish before the last prompts are in, so few steps are full-batch "
            "decodes).",
            "",
            "| concurrency | full-batch steps above | decode step (ms) | roofline (ms) | "
            "step / roofline | host CPU per step median / p90 (ms) | linears alone, cuBLAS "
            "(ms, TFLOP/s) | floor: linears + KV read (ms) | step / floor |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in steady:
            d = r["steady"]
            lines.append(
                f"| {r['concurrency']} | {r['decode_steps']} | {d['step_ms']:.2f} | "
                f"{d['roofline_ms']:.2f} | {d['vs_roofline']:.2f}x | "
                f"{d['host_ms']:.2f} / {d['host_ms_p90']:.2f} | "
                f"{d['linears_ms']:.2f} ({d['linears_tflops']:.0f}) | {d['floor_ms']:.2f} | "
                f"{d['step_ms'] / d['floor_ms']:.2f}x |"
            )
        lines += [
            "",
            "Linears alone: every linear layer of the model once on a batch of that many rows, "
            "as one CUDA graph (cuBLAS, the matmuls the engine runs). The floor adds the KV "
            "bytes at the measured read bandwidth: at high batch the matmuls are bound by "
            "FLOPs, not weight bytes, which the bytes-only roofline leaves out.",
        ]
        lines.append("")
    tails = [r for r in report["engine"] if "slow_calls" in r]
    if tails:
        lines += [
            "The ITL tail: each output's gap is one step call, so the calls at or above the ITL "
            "p99 are the tail. Kind: the batch the call waited for (decode only, or with prompt "
            "tokens), and whether the garbage collector ran in the call. Allocator retries: "
            "times torch's CUDA allocator found no free memory in the run, emptied its cache "
            "and synchronized the device.",
            "",
            "| concurrency | ITL p99 (ms) | calls | at or above p99 | by kind | host ms in them "
            "(median) | slowest call (ms: gap, host, gc; waited-for seqs/tokens) | allocator "
            "retries |",
            "| ---: | ---: | ---: | ---: | --- | ---: | --- | ---: |",
        ]
        for r in tails:
            t = r["slow_calls"]
            kinds = ", ".join(f"{k}: {n}" for k, n in sorted(t["kinds"].items())) or "-"
            top = t["slowest"][0] if t["slowest"] else None
            worst = (
                f"{top['gap_ms']:.1f}, {top['host_ms']:.1f}, {top['gc_ms']:.1f}; "
                f"{top['waited_for'][0]}/{top['waited_for'][1]}"
                if top
                else "-"
            )
            lines.append(
                f"| {r['concurrency']} | {t['itl_p99_ms']:.1f} | {t['calls']} | "
                f"{t['at_or_above_p99']} | {kinds} | {t['host_ms_median_in_tail']:.2f} | "
                f"{worst} | {r.get('allocator_retries', '-')} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
