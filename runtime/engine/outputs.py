"""What the engine hands back: per-request increments and engine-wide gauges."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass(slots=True)
class TokenLogprob:
    """The chosen token's log-probability and the ``top`` N alternatives, best first; a
    prompt token's also has its ``rank`` among the vocabulary (1: the most likely)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    rank: int | None = None


@dataclass(slots=True)
class RequestOutput:
    """One request's progress in one step: the tokens and text it gained since the last one."""

    request_id: str
    new_token_ids: list[int]
    new_text: str  # incrementally detokenized, stop strings removed
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    logprobs: list[TokenLogprob] | None = None
    # Every prompt token's (``SamplingParams.prompt_logprobs``), the first None; only on a
    # request's first output.
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class EngineStats:
    """A snapshot of the scheduler and KV pool, for metrics and the node agent."""

    num_running: int
    num_waiting: int
    num_total_blocks: int
    num_free_blocks: int
    kv_cache_usage: float  # 0..1, blocks held by live sequences
    num_preemptions: int  # cumulative
    prefix_cache_queries: int  # tokens looked up, cumulative
    prefix_cache_hits: int  # tokens found, cumulative
    kv_cache_bytes: int
    held_bytes: int = 0  # all device memory held: weights, workspace, backed KV chunks
    blocked_blocks: int = 0  # blocks a request held back for memory needs (0: none is)
