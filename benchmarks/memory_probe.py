"""Does a runtime stay within the footprint it measured at start-up? A closed-loop load on one
engine, in this process, with every step's device memory read three ways.

The engine sizes its KV pool from ``request - weights - workspace``, the workspace measured at
start-up. If serving later needs more (an eager step the profile did not cover, kernels loaded
late, the allocator fragmenting), the process holds more than its grant, and on a shared GPU
another tenant pays. This drives ``--concurrency`` streams of ``--prompt-len`` + ``--output-len``
tokens for ``--seconds`` and, after every step, reads torch's reserved bytes, NVML's bytes for
this process and the engine's graph/eager step counts; each time one of them grows it prints
the step that grew it. GPU only.

    python benchmarks/memory_probe.py --shape llama-3.2-1b --concurrency 128 --cap 0
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import use_unfused_rope  # benchmarks/engine.py

from berth.runtime.engine import Engine, EngineConfig, SamplingParams, nvml
from berth.runtime.engine.budget import GpuBudget
from berth.runtime.engine.testmodels import make_model

MIB = 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--model-cache", default="/tmp/berth-models")
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--cap", type=int, default=0, help="prompt tokens beside decodes; 0: none")
    ap.add_argument("--kv-gib", type=float, default=8.0)
    ap.add_argument(
        "--budget-gib",
        type=float,
        help="serve a GPU share of this size (request = limit) instead of a fixed --kv-gib pool:"
        " the KV pool is what it leaves, and the allocator is held to the measured limit",
    )
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--max-num-seqs", type=int)
    ap.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    ap.add_argument("--unfused-rope", action="store_true", help="RoPE and cache write apart")
    args = ap.parse_args()
    if args.unfused_rope:
        use_unfused_rope()
    gib = int((args.budget_gib or 0) * (1 << 30))
    budget = GpuBudget(gib, gib) if gib else None
    model_dir = Path(args.model_cache) / args.shape
    if not (model_dir / "config.json").exists():
        make_model(args.shape, model_dir, seed=0, dtype="bfloat16", device="cuda")
    engine = Engine(
        EngineConfig(
            model=str(model_dir),
            dtype="bfloat16",
            device="cuda",
            max_model_len=args.prompt_len + args.output_len + 16,
            max_num_seqs=args.max_num_seqs or args.concurrency,
            max_prefill_tokens_while_decoding=args.cap or None,
            kv_cache_bytes=None if budget else int(args.kv_gib * (1 << 30)),
            budget=budget,
        )
    )
    runner = engine.runner
    fp = runner.footprint
    dev = runner.device
    uuid = runner.gpu_uuid

    def reading() -> tuple[int, int, int]:
        own = nvml.process_bytes(uuid=uuid) or 0
        return torch.cuda.memory_reserved(dev), torch.cuda.max_memory_reserved(dev), own

    reserved0, _, own0 = reading()
    print(
        f"start: weights {fp.weights_bytes / MIB:.0f} MiB, workspace {fp.workspace_bytes / MIB:.0f}"
        f" MiB (allocator peak {fp.allocator_peak_bytes / MIB:.0f}, outside "
        f"{fp.outside_allocator_bytes / MIB:.0f}, allocator held to "
        f"{fp.allocator_limit_bytes / MIB:.0f} under a budget), KV {runner.kv_cache_bytes / MIB:.0f} MiB; "
        f"measured total {(fp.weights_bytes + fp.workspace_bytes + runner.kv_cache_bytes) / MIB:.0f}"
        f" MiB; now reserved {reserved0 / MIB:.0f}, NVML {own0 / MIB:.0f} MiB",
        flush=True,
    )
    vocab = engine.model_config.vocab_size
    rng = random.Random(0)
    params = SamplingParams(
        max_tokens=args.output_len, temperature=args.temperature, ignore_eos=True
    )
    ids = itertools.count()

    def add() -> None:
        prompt = [rng.randrange(vocab) for _ in range(args.prompt_len)]
        engine.add_request(str(next(ids)), prompt, params)

    for _ in range(args.concurrency):
        add()
    last = (reserved0, own0)
    eager = steps = finished = 0
    start = time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        graphs_before = runner.num_graph_replays + runner.num_prefill_graph_replays
        outs = engine.step()
        steps += 1
        seqs, tokens = engine.last_step_batch
        graphed = runner.num_graph_replays + runner.num_prefill_graph_replays > graphs_before
        eager += bool(seqs) and not graphed
        for o in outs:
            if o.finished:
                finished += 1
                add()
        reserved, peak, own = reading()
        if reserved > last[0] or own > last[1] + 16 * MIB:
            print(
                f"t={time.perf_counter() - start:6.2f}s step {steps}: {seqs} seqs, {tokens} tokens,"
                f" {'graph' if graphed else 'EAGER'}: reserved {reserved / MIB:.0f} MiB "
                f"(+{(reserved - last[0]) / MIB:.0f}), peak {peak / MIB:.0f}, NVML {own / MIB:.0f}"
                f" MiB (+{(own - last[1]) / MIB:.0f})",
                flush=True,
            )
            last = (max(reserved, last[0]), max(own, last[1]))
    reserved, peak, own = reading()
    print(
        f"end after {steps} steps ({eager} eager), {finished} requests finished: reserved "
        f"{reserved / MIB:.0f} MiB (start {reserved0 / MIB:.0f}), peak {peak / MIB:.0f}, NVML "
        f"{own / MIB:.0f} MiB (start {own0 / MIB:.0f}, +{(own - own0) / MIB:.0f})",
        flush=True,
    )
    others = {p: b // MIB for p, b in nvml.all_process_bytes(uuid).items()}
    print(f"NVML per process (MiB): {others}", flush=True)


if __name__ == "__main__":
    main()
