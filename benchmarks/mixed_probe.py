"""Why some mixed steps are slow: per step of an arrival run (``--concurrency`` prompts at
once, one admitted per step beside the decodes), the host time of launching it and its device
time (CUDA events around it, synchronized: this run is not pipelined), and a torch profile of
the steps whose batch size is in ``--profile``.

    python benchmarks/mixed_probe.py --concurrency 64 --profile 15,16,17 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from berth.runtime.engine import Engine, EngineConfig, SamplingParams
from berth.runtime.engine.testmodels import make_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--model-dir", default="/tmp/berth-models/llama-3-8b")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--profile", default="15,16,17")
    parser.add_argument("--kv-cache-gib", type=float, default=24.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").exists():
        make_model(args.model, model_dir, seed=0, dtype="bfloat16", device="cuda")
    engine = Engine(EngineConfig(model=str(model_dir), dtype="bfloat16", device="cuda",
                                 max_model_len=args.prompt_len + args.output_len + 256,
                                 max_num_seqs=args.concurrency,
                                 kv_cache_bytes=int(args.kv_cache_gib * (1 << 30))))  # fmt: skip
    runner = engine.runner
    real_execute = runner.execute
    timing: dict[str, Any] = {}

    def timed_execute(*call: Any, **kwargs: Any) -> Any:
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        out = real_execute(*call, **kwargs)
        timing["host_ms"] = 1e3 * (time.perf_counter() - t0)
        stop.record()
        stop.synchronize()
        timing["device_ms"] = start.elapsed_time(stop)
        return out

    runner.execute = timed_execute  # type: ignore[method-assign]
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    for i in range(args.concurrency):
        engine.add_request(str(i), [rng.randrange(vocab) for _ in range(args.prompt_len)], params)
    wanted = {int(b) for b in args.profile.split(",") if b}
    rows: list[dict[str, Any]] = []
    profiles: dict[int | str, str] = {}
    while engine.has_unfinished() and len(rows) < args.concurrency + 8:
        seqs = len(engine.scheduler.running) + (1 if engine.scheduler.waiting else 0)
        timing.clear()
        if seqs in wanted and seqs not in profiles:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:  # fmt: skip
                engine.step()
            profiles[seqs] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
            profiles[f"{seqs}-cuda"] = prof.key_averages().table(
                sort_by="self_cuda_time_total", row_limit=10
            )
        else:
            engine.step()
        rows.append({"launched": list(engine.last_step_batch), **timing})
    lines = [
        "| step | launched seqs/tokens | host ms (launch) | device ms |",
        "| ---: | --- | ---: | ---: |",
    ]
    for i, r in enumerate(rows):
        if "host_ms" in r:
            lines.append(
                f"| {i} | {r['launched'][0]}/{r['launched'][1]} | {r['host_ms']:.2f} | {r['device_ms']:.2f} |"
            )
    text = (
        "\n".join(lines)
        + "\n\n"
        + "\n\n".join(f"### {k}\n\n```\n{v}\n```" for k, v in profiles.items())
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mixed-probe.md").write_text(text)
    (args.out / "mixed-probe.json").write_text(json.dumps(rows))
    print("\n".join(lines[:80]))


if __name__ == "__main__":
    main()
