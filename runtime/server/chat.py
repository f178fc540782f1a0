"""``POST /v1/chat/completions``: the conversation through the model's chat template."""

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import Response
from jinja2 import TemplateError

from berth.runtime.server.body import parse_body
from berth.runtime.server.chunks import chat_choice
from berth.runtime.server.engine_messages import EngineRequest
from berth.runtime.server.errors import invalid_request
from berth.runtime.server.generation import respond
from berth.runtime.server.prompts import check_prompt_bytes, check_sequence_count
from berth.runtime.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    TopLogprob,
)
from berth.runtime.server.renderer import ChoiceProgress, Renderer
from berth.runtime.server.sampling import (
    chat_messages,
    check_prompt,
    check_supported,
    resolve_max_tokens,
    sampling_params,
    validate_params,
)

if TYPE_CHECKING:
    from berth.runtime.engine import TokenLogprob
    from berth.runtime.engine.tokenizer import Tokenizer


def chat_logprobs(entries: "list[TokenLogprob]", tokenizer: "Tokenizer") -> ChatLogprobs:
    """OpenAI's chat logprobs: per token, its text, bytes, logprob and top alternatives."""

    def top(token_id: int, logprob: float) -> TopLogprob:
        text = tokenizer.decode([token_id])
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    content = []
    for entry in entries:
        chosen = top(entry.token_id, entry.logprob)
        alternatives = [top(t, lp) for t, lp in entry.top]
        content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=alternatives))
    return ChatLogprobs(content=content)


class ChatRenderer(Renderer):
    """Chat completion bodies and ``chat.completion.chunk`` events for one request."""

    ID_PREFIX = "chatcmpl"
    CHUNK_OBJECT = "chat.completion.chunk"
    RESPONSE_MODEL = ChatCompletionResponse
    CHUNK_MODEL = ChatCompletionChunk

    def __init__(
        self,
        request: ChatCompletionRequest,
        model: str,
        tokenizer: "Tokenizer",
        prompt_tokens: int,
        choices: int,
    ) -> None:
        logprobs = bool(request.logprobs)
        super().__init__(model, tokenizer, prompt_tokens, request.stream_options, logprobs, choices)
        self.choices = choices

    def final_choice(self, choice: ChoiceProgress) -> ChatChoice:
        logprobs = chat_logprobs(choice.logprobs, self.tokenizer) if self.with_logprobs else None
        message = AssistantMessage(content="".join(choice.text))
        return ChatChoice(
            index=choice.index,
            message=message,
            logprobs=logprobs,
            finish_reason=choice.finish_reason,
        )

    def stream_choice(
        self, index: int, text: str, logprobs: "list[TokenLogprob]", finish_reason: str | None
    ) -> str:
        entries = chat_logprobs(logprobs, self.tokenizer).model_dump_json() if logprobs else "null"
        return chat_choice(index, text, entries, finish_reason)

    def opening_chunks(self) -> Iterator[str]:
        for index in range(self.choices):
            delta = ChatDelta(role="assistant", content="")
            yield self.chunk([ChatChunkChoice(index=index, delta=delta)])


def _max_tokens(request: ChatCompletionRequest) -> tuple[int | None, str]:
    """The completion budget and the field it came from (the newer name wins)."""
    if request.max_completion_tokens is not None:
        return request.max_completion_tokens, "max_completion_tokens"
    return request.max_tokens, "max_tokens"


async def create_chat_completion(raw: Request) -> Response:
    """Render the messages with the chat template, admit n samples and answer."""
    from berth.runtime.server.app import get_server

    arrival = time.monotonic()
    server = get_server(raw)
    request = await parse_body(raw, ChatCompletionRequest, server.settings)
    loop, model = server.serving_loop(request.model)
    check_supported(request)
    tokenizer, max_len = model.tokenizer, model.max_model_len
    messages = chat_messages(request)
    n = request.n or 1
    check_sequence_count(1, n, loop.capacity)
    size = sum(len(m["content"].encode()) for m in messages)
    check_prompt_bytes(size, model.max_prompt_bytes, "messages")
    try:
        ids = await model.encoder.encode_chat(messages)
    except (ValueError, TemplateError) as exc:
        raise invalid_request(f"messages: {exc}", param="messages") from exc
    check_prompt(ids, max_len, "messages")
    requested, param = _max_tokens(request)
    max_tokens = resolve_max_tokens(requested, param, len(ids), max_len)
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    renderer = ChatRenderer(request, server.model_name, tokenizer, len(ids), n)
    engine_requests = []
    for choice in range(n):
        params = sampling_params(request, max_tokens, logprobs, choice)
        validate_params(params, max_len)
        engine_requests.append(EngineRequest(f"{renderer.id}-{choice}", ids, params))
    stream = loop.submit(engine_requests, arrival, server.settings.request_timeout_s)
    headers = {"X-Request-Id": renderer.id}
    return await respond(raw, loop, stream, renderer, bool(request.stream), headers)
