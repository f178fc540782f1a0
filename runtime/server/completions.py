"""``POST /v1/completions``: legacy text completion, one choice per prompt and sample."""

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, cast

from fastapi import Request
from fastapi.responses import Response

from berth.runtime.server.body import parse_body
from berth.runtime.server.chunks import completion_choice
from berth.runtime.server.engine_messages import EngineRequest
from berth.runtime.server.generation import respond
from berth.runtime.server.prompts import check_prompt_bytes, check_sequence_count
from berth.runtime.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from berth.runtime.server.renderer import ChoiceProgress, Renderer
from berth.runtime.server.sampling import (
    check_prompt,
    check_supported,
    resolve_max_tokens,
    sampling_params,
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
    entries: "list[TokenLogprob]", tokenizer: "Tokenizer", offset: int
) -> CompletionLogprobs:
    """OpenAI's parallel-list logprobs; ``offset`` is the text length before these tokens."""
    out = CompletionLogprobs()
    for entry in entries:
        token = tokenizer.decode([entry.token_id])
        out.tokens.append(token)
        out.token_logprobs.append(entry.logprob)
        out.top_logprobs.append({tokenizer.decode([t]): lp for t, lp in entry.top})
        out.text_offset.append(offset)
        offset += len(token)
    return out


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
        self.prompt_texts = prompt_texts
        self.n = choices_per_prompt
        self._text_so_far: dict[int, int] = {}

    def _echoed(self, index: int) -> str:
        return self.prompt_texts[index // self.n] if self.echo else ""

    def final_choice(self, choice: ChoiceProgress) -> CompletionChoice:
        logprobs = None
        if self.with_logprobs:
            logprobs = legacy_logprobs(choice.logprobs, self.tokenizer, 0)
        return CompletionChoice(
            index=choice.index,
            text=self._echoed(choice.index) + "".join(choice.text),
            logprobs=logprobs,
            finish_reason=choice.finish_reason,
        )

    def stream_choice(
        self, index: int, text: str, logprobs: "list[TokenLogprob]", finish_reason: str | None
    ) -> str:
        entries = "null"
        if self.with_logprobs:
            offset = self._text_so_far.get(index, 0)  # text_offset counts from the first chunk
            if logprobs:
                entries = legacy_logprobs(logprobs, self.tokenizer, offset).model_dump_json()
            self._text_so_far[index] = offset + len(text)
        return completion_choice(index, text, entries, finish_reason)

    def opening_chunks(self) -> Iterator[str]:
        if self.echo:
            for index in range(len(self.prompt_texts) * self.n):
                yield self.chunk([CompletionChoice(index=index, text=self._echoed(index))])


def _echo_texts(
    request: CompletionRequest, prompts: list[list[int]], tokenizer: "Tokenizer"
) -> list[str]:
    """Each prompt as text, for ``echo``: as sent, or decoded when sent as token ids."""
    if isinstance(request.prompt, str):
        return [request.prompt]
    if request.prompt and isinstance(request.prompt[0], str):
        return [str(p) for p in request.prompt]
    return [tokenizer.decode(ids) for ids in prompts]


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
    prompts = await _prompts(request, model, loop.capacity)
    budgets = []
    for ids in prompts:
        check_prompt(ids, max_len, "prompt")
        budgets.append(resolve_max_tokens(request.max_tokens, "max_tokens", len(ids), max_len))
    echo_texts = _echo_texts(request, prompts, tokenizer) if request.echo else []
    renderer = CompletionRenderer(
        request, server.model_name, tokenizer, echo_texts, sum(map(len, prompts)), n
    )
    engine_requests: list[EngineRequest] = []
    for ids, max_tokens in zip(prompts, budgets, strict=True):
        for choice in range(n):
            params = sampling_params(request, max_tokens, request.logprobs, choice)
            validate_params(params, max_len)
            request_id = f"{renderer.id}-{len(engine_requests)}"
            engine_requests.append(EngineRequest(request_id, ids, params))
    stream = loop.submit(engine_requests, arrival, server.settings.request_timeout_s)
    headers = {"X-Request-Id": renderer.id}
    return await respond(raw, loop, stream, renderer, bool(request.stream), headers)
