"""Host time of a mixed step's inputs.

A mixed step (decodes beside a prompt chunk) has its host arrays built before the device can
start it, so their cost is device idle time. This times ``model_runner.step_inputs`` (one
vectorised pass) against the sequence-by-sequence construction it replaced (kept below as the
baseline; both results are checked equal). Prints a table; ``--out`` writes it as Markdown.

    python benchmarks/host_step.py --out benchmarks/results/host-step-cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from berth.runtime.engine.config import SamplingParams
from berth.runtime.engine.model_runner import StepInputs, step_inputs
from berth.runtime.engine.scheduler import ScheduledBatch
from berth.runtime.engine.sequence import Sequence

BLOCK = 16


def mixed_batch(decodes: int, context: int, chunk: int) -> tuple[ScheduledBatch, np.ndarray]:
    """``decodes`` sequences of about ``context`` tokens decoding, and one prompt's middle chunk
    of ``chunk`` tokens; the block tables written into host rows as the runner does."""
    rng = np.random.default_rng(0)
    seqs, counts, next_block = [], [], 0
    for i in range(decodes + 1):
        length = context + i if i < decodes else 3 * chunk
        seq = Sequence(str(i), rng.integers(1, 1000, length).tolist(), length, SamplingParams(),
                       length + 64)  # fmt: skip
        seq.num_computed_tokens = length - 1 if i < decodes else chunk
        blocks = -(-(length if i < decodes else 2 * chunk) // BLOCK)
        seq.block_table = list(range(next_block, next_block + blocks))
        next_block += blocks
        seqs.append(seq)
        counts.append(1 if i < decodes else chunk)
    tables = np.zeros((len(seqs), max(len(s.block_table) for s in seqs)), dtype=np.int32)
    for row, seq in enumerate(seqs):
        tables[row, : len(seq.block_table)] = seq.block_table
    return ScheduledBatch(seqs, counts), tables


def per_sequence(batch: ScheduledBatch, block_size: int) -> StepInputs:
    """The construction ``step_inputs`` replaced: a few small array operations per sequence."""
    ids: list[int] = []
    positions, slots, seq_lens, starts, rows = [], [], [], [0], []
    for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        ids += seq.token_ids[start:end]
        pos = np.arange(start, end)
        positions.append(pos)
        slots.append(np.asarray(seq.block_table)[pos // block_size] * block_size + pos % block_size)
        seq_lens.append(end)
        starts.append(starts[-1] + n)
        if end == seq.num_tokens:
            rows.append(starts[-1] - 1)
    tokens = np.stack([np.asarray(ids), np.concatenate(positions), np.concatenate(slots)])
    return StepInputs(tokens, np.asarray(starts, np.int32), np.asarray(seq_lens, np.int32), rows)


def best_ms(fn: Callable[[], object], repeats: int = 7, number: int = 20) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t) / number)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="Markdown results file")
    args = parser.parse_args()
    rows: list[tuple[str, float, float]] = []
    for decodes, context, chunk in ((64, 1024, 512), (256, 1024, 512), (256, 4096, 1792)):
        batch, tables = mixed_batch(decodes, context, chunk)
        new, old = step_inputs(batch, tables, BLOCK), per_sequence(batch, BLOCK)
        assert (new.tokens == old.tokens).all() and new.sample_rows == old.sample_rows
        rows.append(
            (
                f"step inputs: {decodes} decodes of ~{context} tokens + a {chunk}-token chunk",
                best_ms(lambda: per_sequence(batch, BLOCK)),  # noqa: B023
                best_ms(lambda: step_inputs(batch, tables, BLOCK)),  # noqa: B023
            )
        )
    stamp = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
    lines = [
        "# Host time of a step's inputs (CPU)",
        "",
        f"{stamp}; {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"threads, Python {platform.python_version()}, numpy {np.__version__}, torch "
        f"{torch.__version__}; best of 7 x 20 calls.",
        "",
        "| what | before (ms) | now (ms) | x |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {what} | {old:.3f} | {new:.3f} | {old / new:.1f}x |" for what, old, new in rows),
        "",
        "Before: built sequence by sequence (an `np.asarray` of each block table, a few small "
        "array operations each). Now: `model_runner.step_inputs`, one vectorised pass. Results "
        "checked equal.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
