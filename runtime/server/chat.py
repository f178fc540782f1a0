"""``POST /v1/chat/completions``: the conversation through the model's chat template, and
the answer's tool calls read out of each choice's text (:mod:`.tools`, :mod:`.tool_calls`)."""

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import Response
from jinja2 import TemplateError

from berth.runtime.server.body import parse_body
from berth.runtime.server.chunks import chat_choice
from berth.runtime.server.engine_messages import EngineRequest
from berth.runtime.server.errors import invalid_request
from berth.runtime.server.generation import respond
from berth.runtime.server.prompts import (
    NothingToContinue,
    check_prompt_bytes,
    check_sequence_count,
)
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
    FunctionCall,
    ToolCall,
    TopLogprob,
)
from berth.runtime.server.reasoning import ReasoningParser, ThoughtSplitter
from berth.runtime.server.renderer import ChoiceProgress, Renderer, vllm_prompt_logprobs
from berth.runtime.server.sampling import (
    chat_messages,
    check_prompt,
    check_supported,
    request_grammar,
    resolve_max_tokens,
    sampling_params,
    template_options,
    truncated,
    validate_params,
)
from berth.runtime.server.tool_calls import CallDelta, CallFormat, CallReader, merged
from berth.runtime.server.tools import (
    call_format,
    described_in_system,
    prompt_bytes,
    renders_tools,
)

if TYPE_CHECKING:
    from berth.runtime.engine import TokenLogprob
    from berth.runtime.engine.tokenizer import Tokenizer
    from berth.runtime.server.app import ServedModel
    from berth.runtime.server.tools import ToolPlan


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


def tool_calls(fragments: list[CallDelta]) -> list[ToolCall]:
    """A message's calls, put together from a reader's fragments (a call's first fragment has
    its id and name)."""
    calls = []
    for call in merged(fragments):
        function = FunctionCall(name=call.name or "", arguments=call.arguments)
        calls.append(ToolCall(id=call.id or "", function=function))
    return calls


def finish_reason_of(reader: CallReader, reason: str | None) -> str | None:
    """OpenAI's ``tool_calls`` for an output that ended by itself with whole calls; a cut one
    (``length``, ``abort``) keeps its reason, and its calls may lack part of their arguments."""
    return "tool_calls" if reason == "stop" and reader.calls and reader.complete else reason


class ChatRenderer(Renderer):
    """Chat completion bodies and ``chat.completion.chunk`` events for one request; with
    ``reader``, each choice's text is read for tool calls by a reader of its own."""

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
        reader: Callable[[], CallReader] | None = None,
        reasoning: ReasoningParser | None = None,
    ) -> None:
        logprobs = bool(request.logprobs)
        super().__init__(model, tokenizer, prompt_tokens, request.stream_options, logprobs, choices)
        self.choices = choices
        self.prompt_top = request.prompt_logprobs  # vLLM's field: choice 0 scores the prompt
        self.reader = reader
        self._readers = [reader() for _ in range(choices)] if reader is not None else []
        self.reasoning = reasoning
        self._thoughts = [ThoughtSplitter(reasoning) for _ in range(choices)] if reasoning else []

    def response(self, choices: list[ChoiceProgress]) -> dict[str, Any]:
        """The body; with ``prompt_logprobs``, vLLM's list beside the choices (one prompt)."""
        body = super().response(choices)
        entries = choices[0].prompt_logprobs if choices else None
        if self.prompt_top is not None and entries is not None:
            scored = vllm_prompt_logprobs(entries, self.prompt_top, self.tokenizer)
            body["prompt_logprobs"] = [
                None if p is None else {t: e.model_dump() for t, e in p.items()} for p in scored
            ]
        return body

    def final_choice(self, choice: ChoiceProgress) -> ChatChoice:
        logprobs = chat_logprobs(choice.logprobs, self.tokenizer) if self.with_logprobs else None
        text = "".join(choice.text)
        finish_reason = choice.finish_reason
        thought = None
        if self.reasoning is not None:
            splitter = ThoughtSplitter(self.reasoning)
            (began, answer), (ended, rest) = splitter.feed(text), splitter.finish()
            thought, text = (began + ended) or None, answer + rest
        if self.reader is None:
            content: str | None = text or (None if thought else "")
            message = AssistantMessage(reasoning_content=thought, content=content)
        else:
            reader = self.reader()
            piece = reader.feed(text) + reader.finish()
            calls = tool_calls(piece.calls)
            content = piece.content or (None if calls or thought else "")
            message = AssistantMessage(
                reasoning_content=thought, content=content, tool_calls=calls or None
            )
            finish_reason = finish_reason_of(reader, finish_reason)
        return ChatChoice(
            index=choice.index,
            message=message,
            logprobs=logprobs,
            finish_reason=finish_reason,
        )

    def stream_choice(
        self, index: int, text: str, logprobs: "list[TokenLogprob]", finish_reason: str | None
    ) -> str | None:
        entries = chat_logprobs(logprobs, self.tokenizer).model_dump_json() if logprobs else "null"
        thought = ""
        if self._thoughts:
            splitter = self._thoughts[index]
            thought, text = splitter.feed(text)
            if finish_reason is not None:
                ended, rest = splitter.finish()
                thought, text = thought + ended, text + rest
        if not self._readers:
            return chat_choice(index, text, entries, finish_reason, reasoning=thought)
        reader = self._readers[index]
        piece = reader.feed(text)
        if finish_reason is not None:
            piece += reader.finish()
            finish_reason = finish_reason_of(reader, finish_reason)
        if not piece and not thought and finish_reason is None and not logprobs:
            return None  # held back: it may still become a call
        calls = merged(piece.calls)
        return chat_choice(index, piece.content, entries, finish_reason, calls, reasoning=thought)

    def opening_chunks(self) -> Iterator[str]:
        for index in range(self.choices):
            delta = ChatDelta(role="assistant", content="")
            yield self.chunk([ChatChunkChoice(index=index, delta=delta)])


def _max_tokens(request: ChatCompletionRequest) -> tuple[int | None, str]:
    """The completion budget and the field it came from (the newer name wins)."""
    if request.max_completion_tokens is not None:
        return request.max_completion_tokens, "max_completion_tokens"
    return request.max_tokens, "max_tokens"


async def render_chat(
    request: ChatCompletionRequest, plan: "ToolPlan | None", model: "ServedModel"
) -> tuple[list[int], CallFormat | None, Callable[[], CallReader] | None]:
    """The prompt's token ids as the chat template renders the messages (with the tools, in
    the template or described in a system message), the call format and the reader of the
    calls the answer may hold; a rendering that fails is a 400."""
    tokenizer = model.tokenizer
    messages = chat_messages(request)
    options = template_options(request, messages)
    tools, reader, style = None, None, None
    if plan is not None:
        renders = renders_tools(tokenizer)
        if renders:
            tools = plan.template_tools()
        else:
            messages = described_in_system(messages, plan)
        style = call_format(tokenizer.chat_template, renders)
        reader = plan.reader(style)
    check_prompt_bytes(prompt_bytes(messages, tools), model.max_prompt_bytes, "messages")
    try:
        ids = await model.encoder.encode_chat(messages, tools, options)
    except NothingToContinue as exc:
        param = "continue_final_message"
        raise invalid_request(f"{param}: {exc}.", param=param) from exc
    except (ValueError, TypeError, TemplateError) as exc:  # TypeError: a variable's type
        raise invalid_request(f"messages: {exc}", param="messages") from exc
    return ids, style, reader


async def create_chat_completion(raw: Request) -> Response:
    """Render the messages with the chat template, admit n samples and answer."""
    from berth.runtime.server.app import get_server

    arrival = time.monotonic()
    server = get_server(raw)
    request = await parse_body(raw, ChatCompletionRequest, server.settings)
    loop, model = server.serving_loop(request.model)
    plan = check_supported(request)
    tokenizer, max_len = model.tokenizer, model.max_model_len
    n = request.n or 1
    check_sequence_count(1, n, loop.capacity)
    ids, style, reader = await render_chat(request, plan, model)
    ids = truncated(ids, request)
    check_prompt(ids, max_len, "messages")
    requested, param = _max_tokens(request)
    max_tokens = resolve_max_tokens(requested, param, len(ids), max_len)
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    renderer = ChatRenderer(
        request, server.model_name, tokenizer, len(ids), n, reader, server.settings.reasoning_parser
    )
    grammar = request_grammar(request, plan, style, server.settings.reasoning_parser)
    engine_requests = []
    for choice in range(n):
        prompt_logprobs = request.prompt_logprobs if choice == 0 else None  # one prompt
        params = sampling_params(request, max_tokens, logprobs, choice, grammar, prompt_logprobs)
        validate_params(params, max_len)
        engine_requests.append(EngineRequest(f"{renderer.id}-{choice}", ids, params))
    stream = loop.submit(engine_requests, arrival, server.settings.request_timeout_s)
    headers = {"X-Request-Id": renderer.id}
    return await respond(raw, loop, stream, renderer, bool(request.stream), headers)
