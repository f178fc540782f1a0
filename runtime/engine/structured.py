"""Structured output: each request with a grammar keeps one llguidance matcher, which says before
every choice which token ids keep the output valid (a JSON schema, any JSON object).

llguidance (the Rust library behind guidance and one of vLLM's backends) reads the model's own
``tokenizer.json`` through the ``tokenizers`` library the engine already uses, computes a
token's mask lazily in well under a millisecond and needs no ahead-of-time compilation, so a
new schema costs no stall. The mask is built on the host from the tokens the request has
produced so far, while the device runs the step whose token it constrains (``Engine.step``);
the sampler applies it (``sampler.allowed_only``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from berth.runtime.engine.grammar import refused_as_value_error
from berth.runtime.engine.tokenizer import Tokenizer

if TYPE_CHECKING:  # imported at the first structured request: an engine without one needs none
    from llguidance import LLExecutor, LLMatcher, LLTokenizer


class Grammars:
    """Matchers for one engine's requests; the vocabulary's index is built at the first one."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: list[int]) -> None:
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, eos_ids
        self._index: LLTokenizer | None = None
        self._executor: LLExecutor | None = None  # threads for many masks at once

    def matcher(self, grammar: str) -> LLMatcher:
        """A fresh matcher, or ``ValueError`` naming ``response_format`` with the grammar's error."""
        from llguidance import LLMatcher, LLTokenizer

        if self._index is None:  # about 0.25 s for a 49k vocabulary, once per engine
            self._index = LLTokenizer(
                self.tokenizer.hf.to_str(), n_vocab=self.vocab_size, eos_token=self.eos_ids
            )
        with refused_as_value_error():
            matcher = LLMatcher(self._index, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"response_format: {matcher.get_error()}")
        return matcher

    def masks(self, matchers: list[LLMatcher | None]) -> tuple[list[int], torch.Tensor]:
        """The rows with a grammar, and for each a row of 32-bit words, bit ``i`` set where
        token ``i`` may come next. Several are computed at once on llguidance's threads (the
        GIL released): the device waits for them before the step's draw."""
        from llguidance import LLExecutor
        from llguidance.numpy import (
            allocate_token_bitmask,
            fill_next_token_bitmask,
            fill_next_token_bitmask_par,
        )

        rows = [i for i, matcher in enumerate(matchers) if matcher is not None]
        words = allocate_token_bitmask(len(rows), self.vocab_size)
        if len(rows) == 1:
            fill_next_token_bitmask(matchers[rows[0]], words, 0)  # type: ignore[arg-type]
        else:
            if self._executor is None:  # a few threads: 64 masks take about 0.5 ms on one,
                # and llguidance's default (80 % of the host's CPUs, up to 32) ignores the
                # pod's CPU limit and would contend with the engine's own threads
                self._executor = LLExecutor(num_threads=min(4, len(os.sched_getaffinity(0))))
            pairs = [(matchers[row], k) for k, row in enumerate(rows)]
            fill_next_token_bitmask_par(self._executor, pairs, words)  # type: ignore[arg-type]
        return rows, torch.from_numpy(words)
