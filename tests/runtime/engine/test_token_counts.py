"""The penalized requests' token counts on the device: rows taken, filled, counted, evicted from
preempted sequences and refilled on their return, released at the end."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from berth.runtime.engine.config import SamplingParams
from berth.runtime.engine.model_runner import PENDING
from berth.runtime.engine.sequence import Sequence, SequenceStatus
from berth.runtime.engine.token_counts import PROMPT_BIT, TokenCounts

VOCAB, ROWS = 12, 3
CPU = torch.device("cpu")


def _expected(seq: Sequence) -> torch.Tensor:
    """The row a sequence's tokens should leave: each output id's count, plus PROMPT_BIT on
    the prompt's ids when its repetition penalty is on."""
    row = torch.zeros(VOCAB, dtype=torch.int32)
    for t in seq.output_token_ids:
        row[t] += 1
    if seq.params.repetition_penalty != 1.0:
        for t in set(seq.token_ids[: seq.num_prompt_tokens]):
            row[t] += PROMPT_BIT
    return row


class Rows(RuleBasedStateMachine):
    """Sequences come, draw (the chosen id counted by the table, as the sampler does),
    are preempted and come back, and end; never more run than the table has rows."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = TokenCounts(ROWS, VOCAB, CPU)
        self.live: list[Sequence] = []
        self.n = 0

    def _running(self) -> list[Sequence]:
        return [s for s in self.live if s.status is SequenceStatus.RUNNING]

    @precondition(lambda self: len(self._running()) < ROWS)
    @rule(
        prompt=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=5),
        repetition=st.sampled_from([1.0, 1.2]),
        presence=st.sampled_from([0.0, 0.5]),
    )
    def arrive(self, prompt: list[int], repetition: float, presence: float) -> None:
        params = SamplingParams(presence_penalty=presence, repetition_penalty=repetition,
                                frequency_penalty=0.25 * (self.n % 3))  # fmt: skip
        seq = Sequence(f"r{self.n}", list(prompt), len(prompt), params, 64)
        seq.status = SequenceStatus.RUNNING
        self.n += 1
        self.live.append(seq)

    @precondition(lambda self: any(s.status is SequenceStatus.RUNNING for s in self.live))
    @rule(data=st.data())
    def draw(self, data: st.DataObject) -> None:
        batch = self._running()
        slots = [len(s.token_ids) for s in batch]
        chosen = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=len(batch),
                                    max_size=len(batch)))  # fmt: skip
        penalties = self.counts.select(batch, slots)
        if penalties is not None:
            # the draw's view: each penalized row's own settings, in batch order
            for i, settings in zip(penalties.batch_rows, penalties.settings.tolist(), strict=True):
                p = batch[i].params
                want = [p.frequency_penalty, p.presence_penalty, p.repetition_penalty]
                assert settings == pytest.approx(want)
            penalties.count(torch.tensor(chosen))
        for seq, token in zip(batch, chosen, strict=True):
            seq.token_ids.append(token)

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def preempt_or_resume(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.live))
        if seq.status is SequenceStatus.RUNNING:
            seq.status = SequenceStatus.WAITING
        elif len(self._running()) < ROWS:
            seq.status = SequenceStatus.RUNNING

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def end(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.counts.release(seq)
        assert self.counts.row_of(seq) is None

    @invariant()
    def rows_hold_their_sequences_counts(self) -> None:
        held = {}
        for seq in self.live:
            row = self.counts.row_of(seq)
            if row is None:
                continue
            assert row not in held, "one row, two sequences"
            held[row] = seq
            assert torch.equal(self.counts.table[row], _expected(seq)), seq.request_id
            p = seq.params
            want = [p.frequency_penalty, p.presence_penalty, p.repetition_penalty]
            assert self.counts.settings[row].tolist() == pytest.approx(want)
        assert self.counts.num_held == len(held)


TestRows = Rows.TestCase
TestRows.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_a_row_is_filled_only_from_known_tokens() -> None:
    """A sequence whose earlier token is still a placeholder cannot be counted from the host:
    a defect to raise, not a row to fill with a wrong count."""
    seq = Sequence("x", [1, 2, 3, PENDING], 2, SamplingParams(presence_penalty=1.0), 64)
    seq.status = SequenceStatus.RUNNING
    with pytest.raises(RuntimeError, match="not known yet"):
        TokenCounts(2, VOCAB, CPU).select([seq], [4])


def test_more_running_penalized_sequences_than_rows_is_a_defect() -> None:
    counts = TokenCounts(1, VOCAB, CPU)
    seqs = [Sequence(str(i), [1], 1, SamplingParams(frequency_penalty=1.0), 8) for i in range(2)]
    for seq in seqs:
        seq.status = SequenceStatus.RUNNING
    with pytest.raises(RuntimeError, match="more penalized sequences run"):
        counts.select(seqs, [1, 1])


def test_rows_without_penalties_take_no_row() -> None:
    counts = TokenCounts(2, VOCAB, CPU)
    plain = Sequence("p", [1, 2], 2, SamplingParams(), 8)
    assert counts.select([plain], [2]) is None and counts.num_held == 0
