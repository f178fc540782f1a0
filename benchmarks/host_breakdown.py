"""Where a steady decode step's host time goes, part by part, without a profiler.

``benchmarks/engine.py --host-profile`` cProfiles the steps, which inflates every Python call;
this wraps the engine's and the runner's step parts in wall-clock timers instead (a few
hundred nanoseconds each) and reports milliseconds per step for each, beside the step's host
time as the engine measures it (``Engine.last_step_host_seconds``, waits excluded). The parts
nest: ``execute`` contains the block tables, the pending ids, the staging wait and the graph
replay; ``collect`` contains the wait for the step before (reported apart).

    python benchmarks/host_breakdown.py --model-dir /tmp/berth-bench-model --concurrency 256
    python benchmarks/host_breakdown.py --device cpu --stub-model   # this CPU, no GPU

On the CPU ``--stub-model`` replaces the model by one that returns fixed logits at once, so that
the engine's own host work is what is timed (``draw`` then includes a CPU argmax).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from berth.runtime.engine import Engine, EngineConfig, SamplingParams
from berth.runtime.engine.testmodels import make_model

PARTS = (
    ("scheduler", "schedule"),
    ("runner", "execute"),
    ("runner", "_fill_block_tables"),
    ("runner", "_fill_pending"),
    ("runner", "_await_staging"),
    ("engine", "_draw"),
    ("runner", "copy_to_host"),
    ("engine", "_collect"),
    ("engine", "_settle"),
)


class _Stub:
    """A model that computes nothing: hidden states of zeros, the same logits every step."""

    def __init__(self, vocab: int) -> None:
        self.fixed = torch.randn(1024, vocab)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, meta: object) -> torch.Tensor:
        return torch.zeros(ids.shape[0], 1)

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.fixed[: hidden.shape[0]]


def timed(totals: dict[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - t

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", help="a model folder (default: generate --model)")
    ap.add_argument("--model", default="tiny", help="test-model shape to generate")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kv-cache-gib", type=float, default=30.0)
    ap.add_argument("--stub-model", action="store_true", help="no model compute (CPU only)")
    ap.add_argument("--out", help="Markdown results file")
    args = ap.parse_args()
    model_dir = args.model_dir
    if model_dir is None:
        model_dir = str(Path(tempfile.mkdtemp()) / args.model)
        make_model(args.model, Path(model_dir))
    cuda = args.device == "cuda"
    engine = Engine(
        EngineConfig(
            model=model_dir,
            device=args.device,
            dtype="bfloat16" if cuda else "float32",
            max_num_seqs=args.concurrency,
            max_num_batched_tokens=2048,
            kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)),
        )
    )
    if args.stub_model:
        if cuda:
            raise SystemExit("--stub-model is for the CPU: a GPU step is timed as it runs")
        engine.runner.model = _Stub(engine.model_config.vocab_size)  # type: ignore[assignment]
    totals: dict[str, float] = collections.defaultdict(float)
    owners = {"scheduler": engine.scheduler, "runner": engine.runner, "engine": engine}
    for owner, name in PARTS:
        obj = owners[owner]
        setattr(obj, name, timed(totals, name.lstrip("_"), getattr(obj, name)))
    if cuda:
        size = next(g for g in engine.runner.graph_sizes if g >= args.concurrency)
        graph = engine.runner.graphs[size]
        graph.replay = timed(totals, "graph replay", graph.replay)  # type: ignore[method-assign]
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(
        # the first prompts decode while the last are admitted (a few per step beside decodes)
        max_tokens=args.rounds * args.steps + args.concurrency + 64,
        temperature=0.0,
        ignore_eos=True,
    )
    for i in range(args.concurrency):
        engine.add_request(str(i), [rng.randrange(vocab) for _ in range(args.prompt_len)], params)
    running = engine.scheduler.running
    while engine.scheduler.waiting or any(
        s.num_computed_tokens < s.num_prompt_tokens for s in running
    ):
        engine.step()
    for _ in range(4):
        engine.step()
    rows = []
    for _ in range(args.rounds):
        totals.clear()
        hosts, waits = [], []
        for _ in range(args.steps):
            engine.step()
            hosts.append(engine.last_step_host_seconds)
            waits.append(engine._waited)
        assert len(engine.scheduler.running) == args.concurrency
        per_step = {k: 1e3 * v / args.steps for k, v in totals.items()}
        per_step["collect (less the wait)"] = per_step.pop("collect") - 1e3 * statistics.mean(waits)
        rows.append((1e3 * statistics.median(hosts), 1e3 * statistics.median(waits), per_step))
    parts = list(rows[0][2])
    head = ["round", "host per step (ms)", "wait (ms)", *parts]
    lines = ["| " + " | ".join(head) + " |", "|" + " ---: |" * len(head)]
    for i, (host, wait, per_step) in enumerate(rows, 1):
        cells = [str(i), f"{host:.3f}", f"{wait:.3f}", *(f"{per_step[p]:.3f}" for p in parts)]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        gpu = torch.cuda.get_device_name() if cuda else "none"
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        Path(args.out).write_text(
            f"# Host time of a steady decode step by part\n\n{stamp}; {platform.machine()}, "
            f"{platform.python_version()}, torch {torch.__version__}, GPU {gpu}; model "
            f"{model_dir}, {args.concurrency} sequences decoding, {args.steps} steps per round "
            f"(milliseconds per step).\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
