"""What a scheduling policy does to end-to-end throughput and ITL, before spending device time.

The engine's own scheduler and bookkeeping run for real on the CPU (``Engine`` with a stub model
that computes nothing), and each step it launches advances a virtual clock by the time that step
takes on a GPU, from that GPU's measurements: a decode step's time by batch size, and the cost of
each prompt row a prefill or mixed step computes (padded rows included: a graphed step computes
its whole graph). Requests arrive as ``benchmarks/engine.py`` sends them (one burst, or a closed
loop of ``--rounds``), and the same figures come out: output tokens/s, its share of the issue's
ideal (prompts at the matmul rate, decode steps at their roofline), ITL median and p99, TTFT.

The default costs are the H200's (``engine-pdl-h200-pdl*.json``: steady decode steps 4.58 /
6.24 / 13.33 ms at 1 / 64 / 256; ``itl-burst-h200.md``: 23-25 us a prompt row beside 128
decodes; ``engine-targets-h200-20261206.md``: a 512-row mixed step beside 255 decodes 29 ms).
``--at-limit`` replaces them by the step's limits (decode steps at their roofline, prompt rows at
the matmul rate): what the schedule alone costs an engine whose every step were ideal;
``--decode-target`` by decode steps at a multiple of their roofline (issue 23's 1.2x).

    python benchmarks/schedule_whatif.py --out benchmarks/results/schedule-whatif-h200.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import random
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from host_breakdown import _Stub

from berth.runtime.engine import Engine, EngineConfig, SamplingParams
from berth.runtime.engine.scheduler import ScheduledBatch, padded_size
from berth.runtime.engine.testmodels import make_model

# The runner's prefill/mixed graph sizes at 2,048-token steps (``prefill_graph_sizes`` of the
# H200 runs): a step is padded up to the next one.
GRAPH_SIZES = (16, 32, 64, 128, 256, *range(384, 2049, 128))


def _points(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``"1:4.58,64:6.24"`` -> ((1, 64), (4.58, 6.24)): a curve to interpolate."""
    pairs = sorted(tuple(float(v) for v in p.split(":")) for p in text.split(","))
    return tuple(x for x, _ in pairs), tuple(y for _, y in pairs)


@dataclass(frozen=True)
class StepCosts:
    """A step's device time from what it computes."""

    decode_ms: tuple[tuple[float, ...], tuple[float, ...]]  # decode step by batch size
    prompt_us: tuple[tuple[float, ...], tuple[float, ...]]  # a prompt row, by decodes beside it
    roofline_ms: tuple[tuple[float, ...], tuple[float, ...]]  # decode step's bytes at read rate
    ideal_prompt_us: float  # a prompt row's FLOPs at the matmul rate

    def step_ms(self, decodes: int, tokens: int, graph_sizes: tuple[int, ...]) -> float:
        """Decodes' step plus every prompt row computed, the padding of the graph included."""
        if tokens == decodes:
            return float(np.interp(decodes, *self.decode_ms))
        rows = padded_size(graph_sizes, tokens) or tokens
        base = float(np.interp(decodes, *self.decode_ms)) if decodes else 0.0
        return base + 1e-3 * float(np.interp(decodes, *self.prompt_us)) * (rows - decodes)

    def decode_at(self, times_roofline: float) -> StepCosts:
        """Decode steps at this multiple of their roofline, prompt rows as they are."""
        xs, ys = self.roofline_ms
        return dataclasses.replace(self, decode_ms=(xs, tuple(times_roofline * y for y in ys)))

    def at_limit(self) -> StepCosts:
        """Every step at its limit: decode at the roofline, prompt rows at the matmul rate."""
        flat = ((0.0,), (self.ideal_prompt_us,))
        return dataclasses.replace(self, decode_ms=self.roofline_ms, prompt_us=flat)

    def ideal_tokens_per_s(self, concurrency: int, prompt_len: int, output_len: int) -> float:
        """The issue's ideal: every prompt at the matmul rate, then the decode steps at their
        roofline (``benchmarks/engine.py``'s ``ideal_tokens_per_s``)."""
        seconds = (
            1e-6 * self.ideal_prompt_us * concurrency * prompt_len
            + 1e-3 * output_len * float(np.interp(concurrency, *self.roofline_ms))
        )
        return concurrency * output_len / seconds


@dataclass(frozen=True)
class Policy:
    name: str
    cap: int | None  # prompt tokens beside decodes (None: no cap)
    filled: bool  # the cap raised to fill the step's graph (``Scheduler.step_sizes``)


POLICIES = {
    "held-512": Policy("512, held to the cap", 512, False),
    "filled-512": Policy("512, filled to the graph", 512, True),
    "filled-1024": Policy("1024, filled to the graph", 1024, True),
    "no-cap": Policy("no cap", None, True),
}


def simulate(
    model_dir: str,
    costs: StepCosts,
    policy: Policy,
    concurrency: int,
    rounds: int,
    prompt_len: int,
    output_len: int,
) -> dict[str, Any]:
    """One run of ``benchmarks/engine.py``'s load on the virtual clock. An output collected in
    a call belongs to the batch launched in the call before, which ended when the batch of this
    call began: it is stamped with the clock before this call's step."""
    engine = Engine(
        EngineConfig(
            model=model_dir,
            device="cpu",
            dtype="float32",
            max_num_seqs=concurrency,
            max_num_batched_tokens=2048,
            max_prefill_tokens_while_decoding=policy.cap,
            kv_cache_bytes=1 << 30,
        )
    )
    engine.runner.model = _Stub(engine.model_config.vocab_size)  # type: ignore[assignment]
    engine.scheduler.step_sizes = list(GRAPH_SIZES) if policy.filled else []
    decodes = 0
    schedule = engine.scheduler.schedule

    def counted() -> ScheduledBatch:
        nonlocal decodes
        batch = schedule()
        decodes = sum(
            n == 1 and s.num_computed_tokens >= s.num_prompt_tokens
            for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True)
        )
        return batch

    engine.scheduler.schedule = counted  # type: ignore[method-assign]
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    submitted = 0
    clock = 0.0  # ms
    arrived: dict[str, float] = {}

    def submit() -> None:
        nonlocal submitted
        prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
        arrived[str(submitted)] = clock
        engine.add_request(str(submitted), prompt, params)
        submitted += 1

    for _ in range(concurrency):
        submit()
    steps = 0
    stamps: dict[str, list[float]] = {}
    while engine.has_unfinished():
        before = clock
        outputs = engine.step()
        seqs, tokens = engine.last_step_batch
        if seqs:
            clock += costs.step_ms(decodes, tokens, GRAPH_SIZES)
            steps += 1
        for out in outputs:
            stamps.setdefault(out.request_id, []).append(before)
            if out.finished and submitted < rounds * concurrency:
                submit()
    itl = sorted(b - a for t in stamps.values() for a, b in itertools.pairwise(t))
    ttft = sorted(t[0] - arrived[rid] for rid, t in stamps.items())
    tokens_per_s = submitted * output_len / (clock / 1e3)
    return {
        "concurrency": concurrency,
        "rounds": rounds,
        "policy": policy.name,
        "steps": steps,
        "total_s": clock / 1e3,
        "tokens_per_s": tokens_per_s,
        "of_ideal": tokens_per_s / costs.ideal_tokens_per_s(concurrency, prompt_len, output_len),
        "itl_ms": statistics.median(itl),
        "itl_ms_p99": itl[int(0.99 * len(itl))],
        "ttft_ms": statistics.median(ttft),
        "ttft_ms_p99": ttft[int(0.99 * len(ttft))],
    }


def render(rows: list[dict[str, Any]]) -> str:
    head = ("costs", "concurrency", "arrivals", "prompt tokens beside decodes", "output tok/s",
            "of the ideal", "ITL median / p99 (ms)", "p99 / median", "TTFT median / p99 (ms)")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "| --- | ---: | --- | --- |" + " ---: |" * 5]
    for r in rows:
        arrivals = "one burst" if r["rounds"] == 1 else f"closed loop, {r['rounds']} rounds"
        lines.append(
            f"| {r['costs']} | {r['concurrency']} | {arrivals} | {r['policy']} | "
            f"{r['tokens_per_s']:,.0f} | {r['of_ideal']:.0%} | {r['itl_ms']:.1f} / "
            f"{r['itl_ms_p99']:.1f} | {r['itl_ms_p99'] / r['itl_ms']:.1f}x | "
            f"{r['ttft_ms']:,.0f} / {r['ttft_ms_p99']:,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", default="64,256")
    ap.add_argument("--rounds", default="1,4", help="1: one burst; above 1: a closed loop")
    ap.add_argument("--policies", default=",".join(POLICIES), help=", ".join(POLICIES))
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--decode-ms", default="1:4.58,16:5.41,64:6.24,256:13.33",
                    help="steady decode step (ms) by batch size")  # fmt: skip
    ap.add_argument("--prompt-us", default="0:25.0,64:23.0,128:22.7,256:30.6",
                    help="device time of a prompt row (us) by decodes beside it")  # fmt: skip
    ap.add_argument("--roofline-ms", default="1:3.57,64:4.82,256:8.58",
                    help="decode step's weight and KV bytes at the read rate (ms) by batch")  # fmt: skip
    ap.add_argument("--ideal-prompt-us", type=float, default=18.2,
                    help="a prompt row's FLOPs at the measured matmul rate (us)")  # fmt: skip
    ap.add_argument("--decode-target", type=float, default=1.2,
                    help="the policies of --at-limit also run with decode steps at this multiple "
                         "of their roofline, prompt rows as measured (0: not)")  # fmt: skip
    ap.add_argument("--at-limit", default="filled-512,no-cap",
                    help="policies also run with every step at its limit ('' for none)")  # fmt: skip
    ap.add_argument("--out", help="Markdown results file (a JSON beside it)")
    args = ap.parse_args()
    measured = StepCosts(
        _points(args.decode_ms), _points(args.prompt_us), _points(args.roofline_ms),
        args.ideal_prompt_us,
    )  # fmt: skip
    model_dir = Path(tempfile.mkdtemp()) / "tiny"
    make_model("tiny", model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    # the stub computes nothing: only the positions must hold prompt + output
    config["max_position_embeddings"] = args.prompt_len + args.output_len + 64
    (model_dir / "config.json").write_text(json.dumps(config))
    runs = [("measured", measured, p) for p in args.policies.split(",")]
    limited = [p for p in args.at_limit.split(",") if p]
    if args.decode_target:
        label = f"decode at {args.decode_target}x roofline"
        runs += [(label, measured.decode_at(args.decode_target), p) for p in limited]
    runs += [("at the limit", measured.at_limit(), p) for p in limited]
    rows = []
    for c in (int(c) for c in args.concurrency.split(",")):
        for rounds in (int(r) for r in args.rounds.split(",")):
            for label, costs, key in runs:
                r = simulate(str(model_dir), costs, POLICIES[key], c, rounds, args.prompt_len,
                             args.output_len)  # fmt: skip
                r["costs"] = label
                rows.append(r)
                print(json.dumps(r), flush=True)
    table = render(rows)
    print(table)
    if args.out:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        Path(args.out).write_text(
            f"# Scheduling what-if on a virtual clock\n\n{stamp}; `benchmarks/schedule_whatif.py`"
            f" (the engine's scheduler on the CPU, step times from the device's measurements); "
            f"{args.prompt_len} in / {args.output_len} out, 2,048-token steps. Costs: decode "
            f"steps {args.decode_ms} (batch:ms), prompt rows {args.prompt_us} (decodes:us), "
            f"roofline {args.roofline_ms}, a prompt row at the matmul rate "
            f"{args.ideal_prompt_us} us.\n\n{table}\n"
        )
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
