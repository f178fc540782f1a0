"""``POST /v1/completions``: legacy text completion, one choice per prompt and sample.

With ``echo`` and ``logprobs`` the legacy logprobs cover the prompt's tokens, then the output's
(the engine's ``prompt_logprobs``); streamed, the echoed prompt then goes out with its entries
in the choice's first chunk instead of an opening chunk. ``max_tokens`` 0 (only with ``echo``)
answers the prompt alone: the engine has no request that samples nothing, so such a choice
asks it for one token, whose logits the prompt's last chunk computes anyway (no extra forward
pass), and the renderer drops it: no text, no entry, ``completion_tokens`` 0, ``length``.
"""

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, cast

from fastapi import Request
from fastapi.responses import Response

from berth.runtime.server.body import parse_body
from berth.runtime.server.chunks import completion_choice
from berth.runtime.server.engine_loop import Update
from berth.runtime.server.engine_messages import EngineRequest
from berth.runtime.server.generation import respond
from berth.runtime.server.prompts import check_prompt_bytes, check_sequence_count
from berth.runtime.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from berth.runtime.server.renderer import ChoiceProgress, Renderer, vllm_prompt_logprobs
from berth.runtime.server.sampling import (
    check_prompt,
    check_supported,
    request_grammar,
    resolve_max_tokens,
    sampling_params,
    truncated,
    validate_params,
)

if TYPE_CHECKING:
    from berth.runtime.engine import TokenLogprob
    from berth.runtime.engine.tokenizer import Tokenizer
    from berth.runtime.server.app import ServedModel


async def _prompts(
    request: CompletionRequest, model: "ServedModel", capacity: int
) -> list[list[int]]:
    """Token ids of each prompt: a string, a list of strings, token ids, or lists of those.
    Counted and bounded first; text is tokenized off the event loop."""
    prompt, n = request.prompt, request.n or 1
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], str)):
        texts = [prompt] if isinstance(prompt, str) else [str(p) for p in prompt]
        check_sequence_count(len(texts), n, capacity)
        size = sum(len(text.encode()) for text in texts)
        check_prompt_bytes(size, model.max_prompt_bytes, "prompt")
        return await model.encoder.encode(texts)
    if not prompt or isinstance(prompt[0], int):
        ids = [cast("list[int]", list(prompt))]  # the request model allows only ints here
    else:
        ids = [cast("list[int]", list(p)) for p in prompt]
    check_sequence_count(len(ids), n, capacity)
    return ids


def legacy_logprobs(
    entries: "list[TokenLogprob] | list[TokenLogprob | None]",
    tokenizer: "Tokenizer",
    offset: int,
    token_ids: list[int] | None = None,
    top: int | None = None,
) -> CompletionLogprobs:
    """OpenAI's parallel-list logprobs; ``offset`` is the text length before these tokens.
    A None entry (a prompt's first token) is its token from ``token_ids`` with null
    log-probabilities; ``top`` trims the alternatives (the engine may hold more)."""
    out = CompletionLogprobs()
    for i, entry in enumerate(entries):
        token_id = entry.token_id if entry is not None else cast("list[int]", token_ids)[i]
        token = tokenizer.decode([token_id])
        out.tokens.append(token)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
        else:
            out.token_logprobs.append(entry.logprob)
            out.top_logprobs.append({tokenizer.decode([t]): lp for t, lp in entry.top[:top]})
        out.text_offset.append(offset)
        offset += len(token)
    return out


def _extend(into: CompletionLogprobs, more: CompletionLogprobs) -> None:
    into.tokens += more.tokens
    into.token_logprobs += more.token_logprobs
    into.top_logprobs += more.top_logprobs
    into.text_offset += more.text_offset


class CompletionRenderer(Renderer):
    """Completion bodies and ``text_completion`` chunks for one request."""

    ID_PREFIX = "cmpl"
    CHUNK_OBJECT = "text_completion"
    RESPONSE_MODEL = CompletionResponse
    CHUNK_MODEL = CompletionResponse

    def __init__(
        self,
        request: CompletionRequest,
        model: str,
        tokenizer: "Tokenizer",
        prompts: list[list[int]],
        prompt_texts: list[str],
        prompt_tokens: int,
        choices_per_prompt: int,
    ) -> None:
        with_logprobs = request.logprobs is not None
        super().__init__(
            model, tokenizer, prompt_tokens, request.stream_options, with_logprobs,
            choices_per_prompt,
        )  # fmt: skip
        self.echo = bool(request.echo)
        self.top = request.logprobs
        self.prompt_top = request.prompt_logprobs  # vLLM's field
        self.prompt_only = request.max_tokens == 0  # the one token asked for is dropped
        self.prompts = prompts
        self.prompt_texts = prompt_texts
        self.n = choices_per_prompt
        self._text_so_far: dict[int, int] = {}
        # Streamed echo with logprobs: each choice's prompt entries, until its first chunk.
        self._prompt_entries: dict[int, list[TokenLogprob | None]] = {}

    def _echoed(self, index: int) -> str:
        return self.prompt_texts[index // self.n] if self.echo else ""

    def _prompt_logprobs(
        self, index: int, entries: "list[TokenLogprob | None] | None"
    ) -> CompletionLogprobs:
        """The legacy entries of the echoed prompt (null ones if none came: an abort)."""
        ids = self.prompts[index // self.n]
        if entries is None:
            entries = [None] * len(ids)
        return legacy_logprobs(entries, self.tokenizer, 0, ids, self.top)

    def _finish_reason(self, reason: str | None) -> str | None:
        if self.prompt_only and reason not in (None, "abort"):
            return "length"
        return reason

    def usage(self, choices: list[ChoiceProgress]) -> UsageInfo:
        usage = super().usage(choices)
        if self.prompt_only:
            usage.completion_tokens, usage.total_tokens = 0, usage.prompt_tokens
        return usage

    def final_choice(self, choice: ChoiceProgress) -> CompletionChoice:
        index = choice.index
        logprobs = None
        output_text = "" if self.prompt_only else "".join(choice.text)
        if self.with_logprobs:
            echoed = self._echoed(index)
            logprobs = CompletionLogprobs()
            if self.echo:
                logprobs = self._prompt_logprobs(index, choice.prompt_logprobs)
            if not self.prompt_only:
                _extend(logprobs, legacy_logprobs(choice.logprobs, self.tokenizer, len(echoed)))
        prompt_logprobs = None
        if self.prompt_top is not None and choice.prompt_logprobs is not None:
            prompt_logprobs = vllm_prompt_logprobs(
                choice.prompt_logprobs, self.prompt_top, self.tokenizer
            )
        return CompletionChoice(
            index=index,
            text=self._echoed(index) + output_text,
            logprobs=logprobs,
            finish_reason=self._finish_reason(choice.finish_reason),
            prompt_logprobs=prompt_logprobs,
        )

    def update_chunks(self, update: Update, choices: list[ChoiceProgress]) -> Iterator[str]:
        output = update.output
        entries = None if output is None else output.prompt_logprobs
        if self.echo and self.with_logprobs and entries is not None:
            self._prompt_entries[update.index] = entries
        return super().update_chunks(update, choices)

    def stream_choice(
        self, index: int, text: str, logprobs: "list[TokenLogprob]", finish_reason: str | None
    ) -> str:
        if self.prompt_only:
            text, logprobs = "", []
        finish_reason = self._finish_reason(finish_reason)
        entries = "null"
        if self.with_logprobs:
            out = CompletionLogprobs()
            echoed = ""
            if self.echo and index not in self._text_so_far:  # the prompt goes out first
                out = self._prompt_logprobs(index, self._prompt_entries.pop(index, None))
                echoed = self._echoed(index)
                self._text_so_far[index] = len(echoed)
            offset = self._text_so_far.get(index, 0)  # text_offset counts from the first chunk
            if logprobs:
                _extend(out, legacy_logprobs(logprobs, self.tokenizer, offset))
            if out.tokens:
                entries = out.model_dump_json()
            self._text_so_far[index] = offset + len(text)
            text = echoed + text
        return completion_choice(index, text, entries, finish_reason)

    def opening_chunks(self) -> Iterator[str]:
        if self.echo and not self.with_logprobs:  # with logprobs, in each first chunk
            for index in range(len(self.prompt_texts) * self.n):
                yield self.chunk([CompletionChoice(index=index, text=self._echoed(index))])


def _echo_texts(
    request: CompletionRequest,
    full: list[list[int]],
    prompts: list[list[int]],
    tokenizer: "Tokenizer",
) -> list[str]:
    """Each prompt as text, for ``echo``: as sent, or decoded when sent as token ids or cut by
    ``truncate_prompt_tokens`` (``full`` before the cut, ``prompts`` after)."""
    sent: list[str | None] = [None] * len(prompts)
    if isinstance(request.prompt, str):
        sent = [request.prompt]
    elif request.prompt and isinstance(request.prompt[0], str):
        sent = [str(p) for p in request.prompt]
    return [
        text if text is not None and len(ids) == len(whole) else tokenizer.decode(ids)
        for text, whole, ids in zip(sent, full, prompts, strict=True)
    ]


async def create_completion(raw: Request) -> Response:
    """Admit the prompts (times n) as engine requests and answer, collected or streamed."""
    from berth.runtime.server.app import get_server

    arrival = time.monotonic()
    server = get_server(raw)
    request = await parse_body(raw, CompletionRequest, server.settings)
    loop, model = server.serving_loop(request.model)
    check_supported(request)
    tokenizer, max_len = model.tokenizer, model.max_model_len
    n = request.n or 1
    full = await _prompts(request, model, loop.capacity)
    prompts = [truncated(ids, request) for ids in full]
    budgets = []
    for ids in prompts:
        check_prompt(ids, max_len, "prompt")
        budget = resolve_max_tokens(request.max_tokens, "max_tokens", len(ids), max_len)
        budgets.append(budget or 1)  # 0 (echo only): one token, dropped (see above)
    echo_texts = _echo_texts(request, full, prompts, tokenizer) if request.echo else []
    renderer = CompletionRenderer(
        request, server.model_name, tokenizer, prompts, echo_texts, sum(map(len, prompts)), n
    )
    # The prompt's entries: for the legacy logprobs with echo, for vLLM's field, or both.
    wanted = [request.prompt_logprobs, request.logprobs if request.echo else None]
    prompt_logprobs = max((k for k in wanted if k is not None), default=None)
    grammar = request_grammar(request, None)
    engine_requests: list[EngineRequest] = []
    for ids, max_tokens in zip(prompts, budgets, strict=True):
        for choice in range(n):
            params = sampling_params(
                request, max_tokens, request.logprobs, choice, grammar, prompt_logprobs
            )
            validate_params(params, max_len)
            request_id = f"{renderer.id}-{len(engine_requests)}"
            engine_requests.append(EngineRequest(request_id, ids, params))
    stream = loop.submit(engine_requests, arrival, server.settings.request_timeout_s)
    headers = {"X-Request-Id": renderer.id}
    return await respond(raw, loop, stream, renderer, bool(request.stream), headers)
