"""What the two generation routes share in rendering a response: a choice's progress, the
response id and envelope, usage, and the closing usage chunk.

A route subclasses :class:`Renderer` with how one choice looks, collected (``final_choice``) and
streamed (``stream_choice``), and its opening chunks; the driver in :mod:`.generation` calls
``response``, ``opening_chunks``, ``update_chunks`` and ``closing_chunks``.
"""

import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

from berth.runtime.server.chunks import ChunkFrame
from berth.runtime.server.engine_loop import Update
from berth.runtime.server.protocol import (
    PromptLogprob,
    PromptLogprobs,
    PromptTokensDetails,
    StreamOptions,
    UsageInfo,
)

if TYPE_CHECKING:
    from berth.runtime.engine import TokenLogprob
    from berth.runtime.engine.tokenizer import Tokenizer


@dataclass
class ChoiceProgress:
    """Everything one choice has produced so far."""

    index: int
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: "list[TokenLogprob]" = field(default_factory=list)
    prompt_logprobs: "list[TokenLogprob | None] | None" = None  # with the first output
    finish_reason: str | None = None
    output_tokens: int = 0
    cached_tokens: int = 0

    def add(self, update: Update) -> None:
        output = update.output
        if output is None:  # aborted by the server: drain deadline, timeout or disconnect
            self.finish_reason = "abort"
            return
        self.text.append(output.new_text)
        self.token_ids += output.new_token_ids
        if output.logprobs:
            self.logprobs += output.logprobs
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        self.output_tokens = output.num_output_tokens
        self.cached_tokens = output.num_cached_tokens
        if output.finished:
            self.finish_reason = output.finish_reason or "stop"


def vllm_prompt_logprobs(
    entries: "list[TokenLogprob | None]", top: int, tokenizer: "Tokenizer"
) -> PromptLogprobs:
    """vLLM's ``prompt_logprobs``: per position None (the first) or the prompt token's entry
    with its rank, then the ``top`` most likely tokens' (ranks 1..top) where they differ."""
    decoded: dict[int, str] = {}

    def text(token_id: int) -> str:
        if token_id not in decoded:
            decoded[token_id] = tokenizer.decode([token_id])
        return decoded[token_id]

    out: PromptLogprobs = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        position = {entry.token_id: PromptLogprob(
            logprob=entry.logprob, rank=entry.rank, decoded_token=text(entry.token_id))}  # fmt: skip
        for rank, (token_id, logprob) in enumerate(entry.top[:top], start=1):
            if token_id not in position:
                position[token_id] = PromptLogprob(
                    logprob=logprob, rank=rank, decoded_token=text(token_id)
                )
        out.append(position)
    return out


class Renderer(ABC):
    """How one route turns choice progress into its response body and SSE chunks."""

    ID_PREFIX: ClassVar[str]  # "cmpl", "chatcmpl"
    CHUNK_OBJECT: ClassVar[str]  # the chunks' ``object``
    RESPONSE_MODEL: ClassVar[type[BaseModel]]  # the body: ``id, created, model, choices, usage``
    CHUNK_MODEL: ClassVar[type[BaseModel]]  # a chunk, the same fields

    def __init__(
        self,
        model: str,
        tokenizer: "Tokenizer",
        prompt_tokens: int,
        stream_options: StreamOptions | None,
        with_logprobs: bool,
        choices_per_prompt: int,
    ) -> None:
        self.id = f"{self.ID_PREFIX}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_tokens = prompt_tokens
        options = stream_options or StreamOptions()
        self.include_usage = bool(options.include_usage)
        # vLLM's continuous_usage_stats: every chunk carries the usage so far.
        self.continuous_usage = self.include_usage and bool(options.continuous_usage_stats)
        self.with_logprobs = with_logprobs
        self.choices_per_prompt = choices_per_prompt
        self.frame = ChunkFrame(self.id, self.CHUNK_OBJECT, self.created, model, self.include_usage)

    def usage(self, choices: list[ChoiceProgress]) -> UsageInfo:
        """Tokens so far; each prompt counts once, with the prefix-cache hits of its first
        choice (the prompt tokens that choice did not have to compute)."""
        completion = sum(c.output_tokens for c in choices)
        cached = sum(c.cached_tokens for c in choices[:: self.choices_per_prompt])
        return UsageInfo(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )

    def chunk(self, choices: list[Any], usage: UsageInfo | None = None) -> str:
        """A chunk built from the route's pydantic models (the rare ones: opening, usage)."""
        if usage is None and self.continuous_usage:
            usage = self.usage([])
        chunk = self.CHUNK_MODEL(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )
        return chunk.model_dump_json(exclude=None if self.include_usage else {"usage"})

    def response(self, choices: list[ChoiceProgress]) -> dict[str, Any]:
        """The collected (non-streamed) body."""
        body = self.RESPONSE_MODEL(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[self.final_choice(c) for c in choices],
            usage=self.usage(choices),
        )
        return body.model_dump()

    def update_chunks(self, update: Update, choices: list[ChoiceProgress]) -> Iterator[str]:
        """The chunk for one engine update of one choice (none when it adds nothing)."""
        choice = choices[update.index]
        output = update.output
        text = output.new_text if output is not None else ""
        if not text and not choice.finish_reason:
            return
        logprobs = output.logprobs if output is not None and self.with_logprobs else None
        choice_json = self.stream_choice(choice.index, text, logprobs or [], choice.finish_reason)
        if choice_json is None:
            return
        if self.continuous_usage:
            yield self.frame.chunk(choice_json, self.usage(choices).model_dump_json())
        else:
            yield self.frame.chunk(choice_json)

    @abstractmethod
    def final_choice(self, choice: ChoiceProgress) -> BaseModel:
        """One choice of the collected body."""

    @abstractmethod
    def stream_choice(
        self, index: int, text: str, logprobs: "list[TokenLogprob]", finish_reason: str | None
    ) -> str | None:
        """One streamed choice as JSON text (see :mod:`.chunks`); None when the update
        changes nothing the client sees yet (text held back while it may be a tool call)."""

    @abstractmethod
    def opening_chunks(self) -> Iterator[str]: ...

    def closing_chunks(self, choices: list[ChoiceProgress]) -> Iterator[str]:
        if self.include_usage:
            yield self.chunk([], usage=self.usage(choices))
