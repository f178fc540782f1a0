"""One request's state as it moves through the engine: its tokens, KV blocks and progress."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from berth.runtime.engine.config import SamplingParams
from berth.runtime.engine.outputs import FinishReason, TokenLogprob


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_arrival = itertools.count()

ROOT = 0  # the prefix id before a sequence's first block (see ``KvBlockPool``)


@dataclass(eq=False)
class Sequence:
    """Tokens (prompt then output), the KV blocks that hold them, and how many are computed.

    Invariant: ``num_computed_tokens <= len(token_ids)`` and the first ``num_computed_tokens``
    tokens have their keys and values in ``block_table``'s blocks, in order (written by a batch
    already launched on the device's stream). Between engine steps their ids are known too:
    only a token past them can be a placeholder still on the device. A preempted
    sequence drops its blocks and computes again from token 0 (the prefix cache usually
    returns most of them).
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    max_num_tokens: int  # prompt + output tokens at which it ends with "length"
    arrival: int = field(default_factory=lambda: next(_arrival))
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_named_blocks: int = 0  # leading full blocks whose prefix is named in the prefix cache
    prefix_id: int = ROOT  # the prefix id of the last of them (chains the next block's name)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first admission)
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None
    # The prompt tokens scored so far, in order, the first None (``prompt_logprobs``).
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
