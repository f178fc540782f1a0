"""Choosing the next token of each sequence from its logits, in one batched pass.

Greedy rows take the argmax. Random rows apply temperature, then top-k and top-p on the sorted
distribution, then min-p, and draw with the exponential-race trick (argmax of p / E with
E ~ Exp(1)), which needs one noise vector per row: a request with a seed draws its noise from
its own generator, so its tokens do not depend on what else is in the batch. Log-probabilities
come from the model's raw distribution (before temperature and truncation). The repetition,
presence and frequency penalties (counted on the device, ``token_counts``) and logit bias
adjust the logits first, and a grammar's mask
(``structured``) rules out the ids that would break it, for the choice only.

``Sampler.draw`` does all of it on the device without waiting for it: the per-row settings go
up through pinned memory, and nothing is read back. So the engine draws a batch's tokens right
after launching it, as it takes a greedy batch's argmax, and reads them a step later
(``Draw.to_host``, ``Draw.read``): sampled requests are pipelined like greedy ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from berth.kernels.penalties import penalize_
from berth.runtime.engine.config import SamplingParams
from berth.runtime.engine.outputs import TokenLogprob
from berth.runtime.engine.token_counts import OUTPUT_COUNT, PenaltyRows
from berth.runtime.engine.uploads import upload, upload_values


@dataclass(eq=False)
class Draw:
    """A batch's chosen ids and, when a row asked for them, log-probabilities: on the device
    as ``Sampler.draw`` leaves them, on the host after ``to_host`` (valid once the stream has
    passed the copies)."""

    chosen: torch.Tensor  # [S] int64
    want: list[int | None]  # per row: how many alternatives it asked for, None: no log-probs
    picked: torch.Tensor | None = None  # [S] float32: the chosen ids' log-probabilities
    top_vals: torch.Tensor | None = None  # [S, N] the best N log-probabilities, N the most asked
    top_ids: torch.Tensor | None = None  # [S, N]

    def to_host(self) -> Draw:
        """Start copying the log-probabilities to pinned host memory (the ids have their own
        buffers in the runner); read them once the stream passes an event recorded after."""
        if self.picked is None or self.top_vals is None or self.top_ids is None:
            return self
        copy = [t.to("cpu", non_blocking=True) for t in (self.picked, self.top_vals, self.top_ids)]
        return Draw(self.chosen, self.want, *copy)

    def read(self, ids: list[int]) -> list[TokenLogprob | None] | None:
        """Each row's ``TokenLogprob`` (None where it asked for none), given the chosen ``ids``."""
        if self.picked is None or self.top_vals is None or self.top_ids is None:
            return None
        picked, vals, top = self.picked.tolist(), self.top_vals.tolist(), self.top_ids.tolist()
        out: list[TokenLogprob | None] = []
        for i, k in enumerate(self.want):
            if k is None:
                out.append(None)
            else:
                out.append(
                    TokenLogprob(ids[i], picked[i], list(zip(top[i][:k], vals[i][:k], strict=True)))
                )
        return out


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def request_generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def __call__(
        self,
        logits: torch.Tensor,  # [S, V], the model's dtype
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        banned: list[frozenset[int]] | None = None,  # per row: ids it may not choose now
        penalties: PenaltyRows | None = None,  # the penalized rows' token counts
        allowed: tuple[list[int], torch.Tensor] | None = None,  # grammars' rows and bitmasks
    ) -> tuple[list[int], list[TokenLogprob | None] | None]:
        """The chosen ids and log-probabilities, read back now (waits for the device)."""
        draw = self.draw(logits, params, generators, banned, penalties, allowed)
        ids: list[int] = draw.chosen.tolist()
        return ids, draw.read(ids)

    def draw(
        self,
        logits: torch.Tensor,  # [S, V], the model's dtype
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        banned: list[frozenset[int]] | None = None,
        penalties: PenaltyRows | None = None,
        allowed: tuple[list[int], torch.Tensor] | None = None,
    ) -> Draw:
        """Choose each row's token on the device, and count it in ``penalties``' rows;
        nothing here waits for the device."""
        greedy = [p.greedy for p in params]
        choose_from = _adjusted(logits, params, penalties)
        if banned is not None:
            choose_from = _mask(choose_from, banned)
        if allowed is not None:
            choose_from = allowed_only(choose_from, *allowed)
        if all(greedy):
            chosen = choose_from.argmax(dim=-1)
        else:
            chosen = self._sample(choose_from, params, generators, greedy)
        if penalties is not None:
            penalties.count(chosen)
        want = [p.logprobs for p in params]
        if all(n is None for n in want):
            return Draw(chosen, want)
        logprobs = logits.float().log_softmax(dim=-1)
        picked = logprobs.gather(-1, chosen[:, None])[:, 0]
        n = max((k for k in want if k is not None), default=0)
        if n:
            top_vals, top_ids = logprobs.topk(n, dim=-1)
        else:
            top_vals, top_ids = logprobs[:, :0], chosen[:, None][:, :0]
        return Draw(chosen, want, picked, top_vals, top_ids)

    def _sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        greedy: list[bool],
    ) -> torch.Tensor:
        # Every [rows, vocab] float32 tensor here is 66 MB at 128 rows of a 128k vocabulary,
        # and each new row count reserves new blocks in torch's allocator: the work runs in
        # place on one copy, so that at most three such tensors live at once.
        vocab = logits.shape[1]
        dev = logits.device
        temperature = upload_values(
            [p.temperature if p.temperature > 0 else 1.0 for p in params], dev, torch.float32
        )
        x = logits.to(torch.float32, copy=True).div_(temperature[:, None])
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_p = [p.top_p for p in params]
        if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
            sorted_x, order = x.sort(dim=-1, descending=True)
            ranks = torch.arange(vocab, device=dev)[None, :]
            cut = ranks >= upload_values(top_k, dev, torch.int64)[:, None]
            if any(p < 1.0 for p in top_p):  # over what top-k kept, renormalised
                probs = sorted_x.masked_fill(cut, -torch.inf).softmax(dim=-1)
                before = probs.cumsum(dim=-1) - probs  # mass of the better tokens
                cut |= before > upload_values(top_p, dev, torch.float32)[:, None]
            cut[:, 0] = False
            x = torch.empty_like(x).scatter_(-1, order, sorted_x.masked_fill(cut, -torch.inf))
        probs = x.softmax(dim=-1)
        del x
        min_p = [p.min_p for p in params]
        if any(m > 0.0 for m in min_p):
            least = upload_values(min_p, dev, torch.float32)[:, None]
            floor = least * probs.amax(dim=-1, keepdim=True)
            probs.masked_fill_(probs < floor, 0.0)
        shared = [i for i, g in enumerate(generators) if g is None]
        if len(shared) == len(generators):  # no seeded row: one draw, as below, in place
            noise = torch.empty_like(probs).exponential_(generator=self.generator)
        else:
            noise = torch.empty_like(probs)
            if shared:
                noise[upload_values(shared, dev, torch.int64)] = torch.empty(
                    len(shared), vocab, device=dev
                ).exponential_(generator=self.generator)
            for i, g in enumerate(generators):
                if g is not None:
                    noise[i].exponential_(generator=g)
        sampled = probs.div_(noise).argmax(dim=-1)
        if any(greedy):
            mask = upload_values(greedy, dev, torch.bool)
            sampled = torch.where(mask, logits.argmax(dim=-1), sampled)
        return sampled


def _adjusted(
    logits: torch.Tensor, params: list[SamplingParams], penalties: PenaltyRows | None
) -> torch.Tensor:
    """``logits`` with the logit bias and penalties applied, in float32, or ``logits`` itself
    where no row asks for them. In vLLM's order: the bias, then the repetition penalty over
    every id the prompt or output holds (divide a positive logit, multiply a negative one, as
    transformers does), then OpenAI's: each id's logit less ``frequency_penalty`` x its count
    in the output, less ``presence_penalty`` if the output holds it. The counts come from
    ``penalties``' table rows."""
    rows = [i for i, p in enumerate(params) if p.adjusts_logits]
    if not rows:
        return logits
    dev = logits.device
    x = logits.to(torch.float32, copy=True)
    vocab = x.shape[1]
    biased = [(i * vocab + t, float(b)) for i in rows for t, b in params[i].logit_bias.items()]
    if biased:  # into the flat copy: index_put_ with accumulate costs 0.3 ms of host time
        at, bias = zip(*biased, strict=True)
        x.view(-1).index_add_(
            0, upload_values(at, dev, torch.int64), upload_values(bias, dev, torch.float32)
        )
    if penalties is not None:
        if x.is_cuda:  # one pass (``kernels.penalties``); the same rule as ``penalize``
            penalize_(x, penalties.table, penalties.settings, penalties.at_batch,
                      penalties.at_table, OUTPUT_COUNT)  # fmt: skip
        else:
            repetition = any(params[i].repetition_penalty != 1.0 for i in penalties.batch_rows)
            penalize(x, penalties, repetition)
    return x


def penalize(x: torch.Tensor, penalties: PenaltyRows, repetition: bool) -> None:
    """The penalties on ``x`` [S, V] float32, in place: the rule ``kernels.penalties`` runs on
    the GPU, in torch's operators (the CPU's path and the kernel's reference)."""
    counts = penalties.table.index_select(0, penalties.at_table)
    sel = x.index_select(0, penalties.at_batch)
    frequency, presence, factor = penalties.settings[:, :, None].unbind(1)
    if repetition:
        scaled = torch.where(sel > 0, sel / factor, sel * factor)
        sel = torch.where(counts != 0, scaled, sel)
    output = (counts & OUTPUT_COUNT).float()
    sel -= output * frequency + (output > 0) * presence
    x.index_copy_(0, penalties.at_batch, sel)


def _mask(logits: torch.Tensor, banned: list[frozenset[int]]) -> torch.Tensor:
    """A copy of ``logits`` with each row's banned ids at -inf (min_tokens holds back the stop
    ids); log-probabilities still come from the unmasked ``logits``."""
    rows = [i for i, ids in enumerate(banned) for _ in ids]
    cols = [t for ids in banned for t in ids]
    masked = logits.clone()
    dev = logits.device
    # The -inf made on the device: a Python scalar would be copied there from pageable memory,
    # which waits for the stream (the GPU test in sync-debug mode caught it).
    at = (upload_values(rows, dev, torch.int64), upload_values(cols, dev, torch.int64))
    masked.index_put_(at, masked.new_full((), -torch.inf))
    return masked


def allowed_only(logits: torch.Tensor, rows: list[int], words: torch.Tensor) -> torch.Tensor:
    """A copy of ``logits`` [S, V] where, in each of ``rows``, every id whose bit is clear in
    that row's ``words`` [len(rows), ceil(V/32)] (host int32, ``structured.Grammars.masks``)
    is -inf."""
    dev, vocab = logits.device, logits.shape[1]
    if dev.type == "cuda":
        words = upload(words, dev)
        shifts = torch.arange(32, device=dev, dtype=torch.int32)
        bits = (words.unsqueeze(-1) >> shifts) & 1  # bit k of a word, LSB first, also for < 0
        keep = bits.view(len(rows), -1)[:, :vocab].bool()
    else:  # numpy's unpackbits is many times faster than the shifts on the CPU
        unpacked = np.unpackbits(words.numpy().view(np.uint8), axis=1, bitorder="little")
        keep = torch.from_numpy(unpacked[:, :vocab]).bool()
    out = logits.clone()
    index = upload_values(rows, dev, torch.int64)
    out[index] = out[index].masked_fill(~keep, -torch.inf)
    return out
