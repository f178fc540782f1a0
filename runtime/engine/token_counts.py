"""Each penalized request's token counts, kept on the device.

Presence, frequency and repetition penalties need, for every id, how often the output holds it
(and, for the repetition penalty, whether the prompt does). Built on the host each step, that
took milliseconds per step at batch 256 and held the draw back until the previous tokens were
collected. Here a request gets a row of one ``[rows, vocab]`` int32 table while it runs: its
output ids are counted in the low 24 bits and its prompt's ids marked by ``PROMPT_BIT``. The
draw that chooses a token counts it in the same stream, so the next draw sees it whether or not
the host has read it: a penalized request pipelines like a sampled one. The table is allocated
with the runner, before the start-up profile, so a GPU share's plan includes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from berth.runtime.engine.config import SamplingParams
from berth.runtime.engine.sequence import Sequence, SequenceStatus
from berth.runtime.engine.uploads import upload_values

PROMPT_BIT = 1 << 24  # an output count stays below it: no context holds 16M tokens
OUTPUT_COUNT = PROMPT_BIT - 1


def _settings(params: SamplingParams) -> np.ndarray:
    return np.array(
        [params.frequency_penalty, params.presence_penalty, params.repetition_penalty],
        dtype=np.float32,
    )


@dataclass(frozen=True)
class PenaltyRows:
    """One draw's penalized logits rows and their table rows, both on the device."""

    table: torch.Tensor  # [rows, vocab] int32
    batch_rows: list[int]  # which rows of the logits have penalties
    at_batch: torch.Tensor  # [P] int64: those rows
    at_table: torch.Tensor  # [P] int64: each one's table row
    settings: torch.Tensor  # [P, 3] float32: each one's frequency, presence, repetition
    row_starts: torch.Tensor  # [P] int64: each one's table row's first element, flattened
    ones: torch.Tensor  # [P] int32

    def count(self, chosen: torch.Tensor) -> None:
        """Add the ids just chosen (``chosen`` [S], one per logits row) to the rows' counts.
        An ``index_add_`` into the flat table: ``index_put_`` with ``accumulate`` took 0.3 ms
        of host time per call on an H100 host (it sorts the indices first)."""
        at = chosen.index_select(0, self.at_batch).add_(self.row_starts)
        self.table.view(-1).index_add_(0, at, self.ones)


class TokenCounts:
    """The table, and which running sequence holds which row (a row per sequence)."""

    def __init__(self, num_rows: int, vocab: int, device: torch.device) -> None:
        self.table = torch.zeros((num_rows, vocab), dtype=torch.int32, device=device)
        # Each row's penalties, written when it is filled: a step uploads only the indices.
        self.settings = torch.ones((num_rows, 3), dtype=torch.float32, device=device)
        self.device = device
        self._ones = torch.ones(num_rows, dtype=torch.int32, device=device)
        self._owner: list[Sequence | None] = [None] * num_rows
        self._row: dict[int, int] = {}  # id(sequence) -> row
        # The last draw's rows, reused while a step's batch holds the same rows in the same
        # places (a steady decode): no upload then. Any fill drops it (a row's settings moved).
        self._last: tuple[list[int | None], PenaltyRows] | None = None

    @property
    def num_held(self) -> int:
        return len(self._row)

    def row_of(self, seq: Sequence) -> int | None:
        return self._row.get(id(seq))

    def rows(
        self, batch_rows: list[int], table_rows: list[int], params: SamplingParams | None = None
    ) -> PenaltyRows:
        """The draw's view of ``table_rows`` (for logits rows ``batch_rows``), their settings
        set to ``params``' first where given. One upload for both index lists, padded to an
        even length so that the second starts 16-byte aligned as the first does: Triton
        specializes a kernel on its pointers' alignment and would compile a second variant,
        in some request's latency, for an odd count."""
        n = len(batch_rows)
        pad = [0] * (n % 2)
        both = upload_values([batch_rows + pad, table_rows + pad], self.device)
        at = both[:, :n]
        if params is not None:
            values = upload_values(_settings(params), self.device).expand(len(table_rows), 3)
            self.settings.index_copy_(0, at[1], values)
        return PenaltyRows(
            self.table,
            batch_rows,
            at[0],
            at[1],
            self.settings.index_select(0, at[1]),
            at[1] * self.table.shape[1],
            self._ones[: len(table_rows)],
        )

    def select(self, sampling: list[Sequence], slots: list[int]) -> PenaltyRows | None:
        """The rows of ``sampling``'s penalized sequences, whose coming tokens sit at ``slots``.
        A running sequence without a row gets one, filled from the tokens before its slot (all known
        on the host then: it is new, or was preempted and computed again)."""
        rows = [self._row.get(id(seq)) for seq in sampling]
        # a sequence that ended meanwhile (a stop collected before this draw) gets no row:
        # its token is dropped
        missing = [
            i
            for i, row in enumerate(rows)
            if row is None and sampling[i].params.penalized and not sampling[i].is_finished
        ]
        for i in missing:
            row = rows[i] = self._take(sampling[i])
            self.fill(row, sampling[i], slots[i])
        if self._last is not None and self._last[0] == rows:
            return self._last[1]
        batch_rows = [i for i, row in enumerate(rows) if row is not None]
        if not batch_rows:
            return None
        penalties = self.rows(batch_rows, [row for row in rows if row is not None])
        self._last = (rows, penalties)
        return penalties

    def fill(self, row: int, seq: Sequence, slot: int) -> None:
        """Set ``row`` to ``seq``'s counts: the outputs before ``slot`` and, when its repetition
        penalty is on, the prompt's ids."""
        outputs = seq.token_ids[seq.num_prompt_tokens : slot]
        if any(t < 0 for t in outputs):
            raise RuntimeError(f"{seq.request_id}: a token before slot {slot} is not known yet")
        self._last = None
        self.settings[row] = upload_values(_settings(seq.params), self.device)
        self.table[row].zero_()
        prompt = np.empty(0, dtype=np.int64)
        if seq.params.repetition_penalty != 1:
            prompt = np.unique(np.asarray(seq.token_ids[: seq.num_prompt_tokens], dtype=np.int64))
        ids = np.concatenate([prompt, np.asarray(outputs, dtype=np.int64)])
        if len(ids):
            add = np.ones(len(ids), dtype=np.int32)
            add[: len(prompt)] = PROMPT_BIT
            self.table[row].index_add_(
                0, upload_values(ids, self.device), upload_values(add, self.device)
            )

    def release(self, seq: Sequence) -> None:
        """``seq`` ended: its row is free (a count still in flight lands before a reuse's
        zeroing, both in stream order)."""
        row = self._row.pop(id(seq), None)
        if row is not None:
            self._owner[row] = None

    def _take(self, seq: Sequence) -> int:
        """A free row, else one whose sequence is not running (preempted: it refills on return)."""
        free = next((r for r, s in enumerate(self._owner) if s is None), None)
        if free is None:
            free = next(
                (r for r, s in enumerate(self._owner)
                 if s is not None and s.status is not SequenceStatus.RUNNING),
                None,
            )  # fmt: skip
            if free is None:
                raise RuntimeError("more penalized sequences run than the table has rows")
            evicted = self._owner[free]
            assert evicted is not None
            del self._row[id(evicted)]
        self._owner[free] = seq
        self._row[id(seq)] = free
        return free
