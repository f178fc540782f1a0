"""Log-probabilities of a request's prompt tokens (vLLM's ``prompt_logprobs``; what
lm-evaluation-harness reads through ``echo`` and ``logprobs`` to score a continuation).

The hidden state at position ``p`` predicts the token at ``p + 1``: a prompt of ``P`` tokens
has ``P - 1`` scored tokens (the first has no entry, ``None``), from the rows of positions
``0 .. P - 2``; the row of ``P - 1`` is the one the first output token is sampled from. Under
chunked prefill each step scores the positions of its chunk, so a prompt's entries arrive over
several steps, in order, and the engine hands them over with the request's first output.

Memory: a step of 2,048 prompt tokens on a 128k vocabulary would need 1 GiB for its float32
log-probabilities at once. ``score`` takes ``ROW_SLICE`` rows at a time (their logits, one
float32 log_softmax, the chosen id's value, its rank and the top k), so the peak is that of a
128-row sampling step with log-probabilities, which the sampler already allows for; only the
picked values and the top k stay.

Like the sampler's log-probabilities this is queued on the device without waiting for it:
``to_host`` starts the copies, ``record`` reads them once the engine has waited for the step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from berth.runtime.engine.outputs import TokenLogprob
from berth.runtime.engine.scheduler import ScheduledBatch
from berth.runtime.engine.sequence import Sequence
from berth.runtime.engine.uploads import upload_values

ROW_SLICE = 128  # rows of [rows, vocab] float32 computed at once


@dataclass(eq=False)
class PromptRows:
    """The rows of one prefill or mixed step that score prompt tokens.

    Span ``i`` scores ``counts[i]`` tokens of ``seqs[i]`` from position ``firsts[i]`` on (the
    token at ``firsts[i] + j`` from the row of position ``firsts[i] + j - 1``); ``rows`` and
    ``targets`` hold every span's step rows and scored token ids, concatenated."""

    seqs: list[Sequence]
    firsts: list[int]
    counts: list[int]
    rows: list[int]
    targets: list[int]
    top: int  # the most alternatives a span asked for


def prompt_rows(batch: ScheduledBatch) -> PromptRows | None:
    """The rows of ``batch`` (before its launch counts its tokens as computed) that score the
    prompt tokens of requests asking for them; None when none does. Positions already scored
    (a preempted sequence computing its prompt again) are left out."""
    out = PromptRows([], [], [], [], [], 0)
    start = 0  # the step row of each sequence's first new token
    for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
        scored, top = seq.prompt_logprobs, seq.params.prompt_logprobs
        if scored is not None and top is not None:
            computed = seq.num_computed_tokens
            first = max(computed, len(scored) - 1)  # first row position
            end = min(computed + n, seq.num_prompt_tokens - 1)  # past the last row position
            if first < end:
                out.seqs.append(seq)
                out.firsts.append(first + 1)
                out.counts.append(end - first)
                out.rows += range(start + first - computed, start + end - computed)
                out.targets += seq.token_ids[first + 1 : end + 1]
                out.top = max(out.top, top)
        start += n
    return out if out.seqs else None


@dataclass(eq=False)
class PromptLogprobs:
    """A step's scored prompt tokens: on the device as ``score`` leaves them, on the host after
    ``to_host`` (valid once the stream has passed the copies)."""

    rows: PromptRows
    picked: torch.Tensor  # [R] float32: each scored token's log-probability
    ranks: torch.Tensor  # [R] int64: its rank in its row (1: the most likely)
    top_vals: torch.Tensor  # [R, N] float32, N = rows.top
    top_ids: torch.Tensor  # [R, N] int64

    def to_host(self) -> PromptLogprobs:
        picked, ranks, vals, ids = (
            t.to("cpu", non_blocking=True)
            for t in (self.picked, self.ranks, self.top_vals, self.top_ids)
        )
        return PromptLogprobs(self.rows, picked, ranks, vals, ids)

    def record(self) -> None:
        """Append each span's entries to its sequence's ``prompt_logprobs`` (positions it
        holds already are skipped)."""
        picked, ranks = self.picked.tolist(), self.ranks.tolist()
        vals, ids = self.top_vals.tolist(), self.top_ids.tolist()
        rows, at = self.rows, 0
        for seq, first, count in zip(rows.seqs, rows.firsts, rows.counts, strict=True):
            scored, k = seq.prompt_logprobs, seq.params.prompt_logprobs
            assert scored is not None and k is not None
            for j in range(at + max(len(scored) - first, 0), at + count):
                top = list(zip(ids[j][:k], vals[j][:k], strict=True))
                scored.append(TokenLogprob(rows.targets[j], picked[j], top, ranks[j]))
            at += count


def score(
    hidden: torch.Tensor,  # [T, hidden] the step's hidden states, model dtype
    logits: Callable[[torch.Tensor], torch.Tensor],  # [R, hidden] -> [R, vocab]
    rows: PromptRows,
) -> PromptLogprobs:
    """Queue the scoring of ``rows`` on the device, ``ROW_SLICE`` rows at a time."""
    dev = hidden.device
    index = upload_values(rows.rows, dev)
    targets = upload_values(rows.targets, dev)
    r, n = len(rows.rows), rows.top
    picked = torch.empty(r, dtype=torch.float32, device=dev)
    ranks = torch.empty(r, dtype=torch.int64, device=dev)
    top_vals = torch.empty((r, n), dtype=torch.float32, device=dev)
    top_ids = torch.empty((r, n), dtype=torch.int64, device=dev)
    for s in range(0, r, ROW_SLICE):
        e = min(s + ROW_SLICE, r)
        x = logits(hidden.index_select(0, index[s:e]))  # [rows, vocab]
        logprobs = torch.log_softmax(x, dim=-1, dtype=torch.float32)
        del x
        chosen = logprobs.gather(-1, targets[s:e, None])  # [rows, 1]
        picked[s:e] = chosen[:, 0]
        ranks[s:e] = (logprobs > chosen).sum(dim=-1) + 1
        if n:
            torch.topk(logprobs, n, dim=-1, out=(top_vals[s:e], top_ids[s:e]))
    return PromptLogprobs(rows, picked, ranks, top_vals, top_ids)
