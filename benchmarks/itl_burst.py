"""Inter-token latency of running requests while a burst of prompts arrives, against the time to
first token of the burst, for several caps on prompt tokens per step while sequences decode
(``max_prefill_tokens_while_decoding``).

``--decoders`` requests decode steadily; then ``--burst`` prompts of ``--prompt-len`` tokens
arrive at once. Every step is timed. Reported per cap: the decoders' inter-token latency
(median and p99) over the burst's prefill, the burst's time to first token (median and p99),
and the steps the burst took. A step's time grows with its prompt tokens and every decoding
sequence waits for the whole step, so a smaller cap keeps ITL near the decode step's time while
the burst's prompts take more steps to prefill: this measures both sides.

    python benchmarks/itl_burst.py --device cuda --shape llama-3-8b --out results.md
    python benchmarks/itl_burst.py --device cpu --shape tiny         # the mechanism, on a CPU
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from berth.runtime.engine import Engine, EngineConfig, SamplingParams
from berth.runtime.engine.testmodels import make_model


def run(engine: Engine, decoders: int, burst: int, prompt_len: int, salt: int) -> dict[str, float]:
    """One burst; ``salt`` makes its prompts new to the prefix cache."""
    vocab = engine.model_config.vocab_size
    # Long enough to outlast the burst's prefill (the run aborts them after it).
    steady = SamplingParams(max_tokens=engine.max_model_len - 65, temperature=0.0, ignore_eos=True)
    for i in range(decoders):
        engine.add_request(f"d{i}", [(31 * i + j) % (vocab - 1) + 1 for j in range(64)], steady)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running):
        engine.step()
    for _ in range(5):
        engine.step()
    one = SamplingParams(max_tokens=1, temperature=0.0)
    start = time.perf_counter()
    for i in range(burst):
        prompt = [salt + 1, i + 1] + [
            (17 * i + 7 * j) % (vocab - 1) + 1 for j in range(prompt_len - 2)
        ]
        engine.add_request(f"b{i}", prompt, one)
    times: dict[str, list[float]] = {}
    first: dict[str, float] = {}
    steps = 0
    while len(first) < burst:
        outputs = engine.step()
        now = time.perf_counter()
        steps += 1
        for out in outputs:
            if out.request_id.startswith("b"):
                first.setdefault(out.request_id, now - start)
            else:
                times.setdefault(out.request_id, []).append(now)
    for i in range(decoders):
        engine.abort_request(f"d{i}")
    while engine.has_unfinished():
        engine.step()
    itl = sorted(b - a for t in times.values() for a, b in itertools.pairwise(t))
    ttft = sorted(first.values())
    return {
        "itl_ms": 1e3 * statistics.median(itl),
        "itl_p99_ms": 1e3 * itl[int(0.99 * (len(itl) - 1))],
        "ttft_ms": 1e3 * statistics.median(ttft),
        "ttft_p99_ms": 1e3 * ttft[int(0.99 * (len(ttft) - 1))],
        "steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="llama-3-8b" if torch.cuda.is_available() else "tiny")
    parser.add_argument("--model-cache", default="/tmp/berth-models")
    parser.add_argument("--decoders", type=int, default=64)
    parser.add_argument("--burst", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--budget", type=int, default=2048, help="max_num_batched_tokens")
    parser.add_argument("--caps", default="0,1024,512,256", help="0: no cap")
    parser.add_argument("--out", help="Markdown results file")
    args = parser.parse_args()
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    model = Path(args.model_cache) / f"{args.shape}-{dtype}"
    if not (model / "config.json").exists():
        make_model(args.shape, model, seed=0, dtype=dtype)
    rows = []
    for cap in [int(c) for c in args.caps.split(",")]:
        config = EngineConfig(
            model=str(model), device=args.device, dtype=dtype, max_num_seqs=args.decoders + args.burst,
            max_num_batched_tokens=args.budget, max_prefill_tokens_while_decoding=cap or None,
            kv_cache_bytes=(16 << 30) if args.device == "cuda" else (1 << 30),
        )  # fmt: skip
        engine = Engine(config)
        run(engine, args.decoders, args.burst, args.prompt_len, salt=0)  # warm-up
        rows.append((cap, run(engine, args.decoders, args.burst, args.prompt_len, salt=1)))
        del engine
        print(rows[-1], flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.machine() + " CPU"
    lines = [
        f"# Inter-token latency under a burst of prompts: {args.shape} on {device}",
        "",
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
        f"{args.decoders} requests decoding, then {args.burst} prompts of {args.prompt_len} tokens "
        f"at once; step budget {args.budget} tokens; second of two runs per cap.",
        "",
        "| prompt tokens per step while decoding | decoders' ITL median (ms) | ITL p99 (ms) | p99 / median "
        "| burst TTFT median (ms) | TTFT p99 (ms) | steps to first tokens |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for cap, r in rows:
        lines.append(
            f"| {cap or 'no cap'} | {r['itl_ms']:.1f} | {r['itl_p99_ms']:.1f} | "
            f"{r['itl_p99_ms'] / r['itl_ms']:.1f}x | {r['ttft_ms']:.0f} | {r['ttft_p99_ms']:.0f} | "
            f"{r['steps']} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
