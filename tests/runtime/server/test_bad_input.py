"""Every kind of bad input gets a 4xx with OpenAI's error object, and the server keeps serving."""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from server_harness import RunningServer

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
TOKENIZE, DETOKENIZE = "/tokenize", "/detokenize"
USER = [{"role": "user", "content": "hello"}]


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: bytes | dict[str, Any]
    status: int
    param: str | None = None
    code: str | None = None
    error_type: str = "invalid_request_error"
    method: str = "POST"
    headers: tuple[tuple[str, str], ...] = ()
    message: str | None = None  # a phrase the error message must contain


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": "hello", "max_tokens": 2, **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": USER, "max_tokens": 2, **fields}


def tool(name: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    function = {"name": name} if parameters is None else {"name": name, "parameters": parameters}
    return {"type": "function", "function": function}


TOOL = tool("f")
CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
LONG_TEXT = "ships and berths " * 400  # far more than the tiny model's 512-token context

CASES = [
    Case("malformed json", COMPLETIONS, b'{"model": "tiny", "prompt": ', 400, code="invalid_json"),
    Case("json array body", COMPLETIONS, b"[1, 2]", 400),
    Case("empty body", CHAT, b"", 400, code="invalid_json"),
    Case("nan", COMPLETIONS, b'{"model":"tiny","prompt":"x","temperature":NaN}', 400,
         "temperature", "invalid_value", message="NaN"),
    Case("infinity where no bound would catch it", COMPLETIONS,
         b'{"model":"tiny","prompt":"x","logit_bias":{"5":-Infinity}}', 400, "logit_bias.5",
         message="finite"),
    Case("invalid utf-8", COMPLETIONS, b'{"model":"tiny","prompt":"\xff\xfe"}', 400,
         code="invalid_encoding"),
    Case("max_tokens as string", COMPLETIONS, completion(max_tokens="5"), 400, "max_tokens"),
    Case("prompt as number", COMPLETIONS, completion(prompt=5), 400, "prompt"),
    Case("messages as string", CHAT, chat(messages="hi"), 400, "messages"),
    Case("stream as string", CHAT, chat(stream="yes"), 400, "stream"),
    Case("temperature as string", CHAT, chat(temperature="hot"), 400, "temperature"),
    Case("stop as numbers", COMPLETIONS, completion(stop=[1, 2]), 400, "stop.0"),
    Case("unknown field", COMPLETIONS, completion(foo=1), 400, "foo", "unknown_argument"),
    Case("unknown message field", CHAT, chat(messages=[{"role": "user", "content": "x", "x": 1}]),
         400, "messages.0.x", "unknown_argument"),
    Case("missing model", CHAT, {"messages": USER}, 400, "model"),
    Case("unknown model", CHAT, chat(model="gpt-4"), 404, "model", "model_not_found"),
    Case("empty messages", CHAT, chat(messages=[]), 400, "messages", "empty_messages"),
    Case("bad role", CHAT, chat(messages=[{"role": "robot", "content": "x"}]), 400,
         "messages.0.role"),
    Case("image content", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), 400, "messages.0.content.1",
         "unsupported_content", message="image inputs are not supported by this model"),
    Case("audio content", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]), 400,
         "messages.0.content.0", "unsupported_content", message="audio inputs"),
    Case("unknown content part", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "video", "video": {}}]}]), 400, "messages.0.content.0"),
    Case("too many prompts", COMPLETIONS, completion(prompt=["a"] * 600), 400, "prompt",
         "too_many_prompts", message="at most 260 prompts"),
    Case("too many token prompts", COMPLETIONS, completion(prompt=[[1]] * 600), 400, "prompt",
         "too_many_prompts"),
    Case("n times prompts", COMPLETIONS, completion(prompt=["a"] * 5, n=64), 400, "n",
         "too_many_sequences", message="at most 52"),
    Case("max_tokens fractional", COMPLETIONS, completion(max_tokens=16.5), 400, "max_tokens",
         message="whole number"),
    Case("n fractional", CHAT, chat(n=1.5), 400, "n", message="whole number"),
    Case("continuous usage without include_usage", CHAT,
         chat(stream=True, stream_options={"continuous_usage_stats": True}), 400,
         "stream_options.continuous_usage_stats"),
    Case("prompt too large", COMPLETIONS, completion(prompt="ship " * 20000), 413, "prompt",
         "prompt_too_large", message="65536 bytes"),
    Case("chat too large", CHAT, chat(messages=[{"role": "user", "content": "ship " * 20000}]),
         413, "messages", "prompt_too_large"),
    Case("empty token prompt", COMPLETIONS, completion(prompt=[[]]), 400, "prompt", "empty_prompt"),
    Case("empty prompt list", COMPLETIONS, completion(prompt=[]), 400, "prompt", "empty_prompt"),
    Case("token id outside vocabulary", COMPLETIONS, completion(prompt=[1, 10**9]), 400),
    Case("prompt longer than context", COMPLETIONS, completion(prompt=LONG_TEXT), 400, "prompt",
         "context_length_exceeded"),
    Case("chat longer than context", CHAT, chat(messages=[{"role": "user", "content": LONG_TEXT}]),
         400, "messages", "context_length_exceeded"),
    Case("max_tokens zero without echo", COMPLETIONS, completion(max_tokens=0), 400,
         "max_tokens", message="only allowed with echo"),
    Case("max_tokens negative with echo", COMPLETIONS, completion(max_tokens=-1, echo=True), 400,
         "max_tokens"),
    Case("max_tokens negative", CHAT, chat(max_tokens=-3), 400, "max_tokens"),
    Case("max_completion_tokens zero", CHAT, chat(max_completion_tokens=0), 400,
         "max_completion_tokens"),
    Case("max_tokens beyond context", COMPLETIONS, completion(max_tokens=100000), 400,
         "max_tokens", "context_length_exceeded"),
    Case("max_tokens beyond context, chat", CHAT, chat(max_tokens=600), 400, "max_tokens",
         "context_length_exceeded"),
    Case("temperature negative", COMPLETIONS, completion(temperature=-0.5), 400, "temperature"),
    Case("temperature too high", CHAT, chat(temperature=2.5), 400, "temperature"),
    Case("temperature infinite", CHAT, b'{"model":"tiny","messages":[{"role":"user","content":"x"}],'
         b'"temperature":1e999}', 400, "temperature"),
    Case("top_p zero", COMPLETIONS, completion(top_p=0), 400, "top_p"),
    Case("top_p above one", CHAT, chat(top_p=1.5), 400, "top_p"),
    Case("top_k below -1", COMPLETIONS, completion(top_k=-2), 400, "top_k"),
    Case("top_k fractional", COMPLETIONS, completion(top_k=1.5), 400, "top_k"),
    Case("min_p above one", CHAT, chat(min_p=2), 400, "min_p"),
    Case("n zero", COMPLETIONS, completion(n=0), 400, "n"),
    Case("seed beyond 64 bits", CHAT, chat(seed=2**70), 400, "seed"),
    Case("logprobs too many", COMPLETIONS, completion(logprobs=50), 400, "logprobs"),
    Case("prompt_logprobs negative", COMPLETIONS, completion(prompt_logprobs=-1), 400,
         "prompt_logprobs"),
    Case("prompt_logprobs too many", CHAT, chat(prompt_logprobs=21), 400, "prompt_logprobs"),
    Case("prompt_logprobs fractional", COMPLETIONS, completion(prompt_logprobs=1.5), 400,
         "prompt_logprobs", message="whole number"),
    Case("prompt_logprobs with stream", COMPLETIONS,
         completion(prompt_logprobs=1, stream=True), 400, "prompt_logprobs", message="stream"),
    Case("prompt_logprobs with stream, chat", CHAT, chat(prompt_logprobs=0, stream=True), 400,
         "prompt_logprobs"),
    Case("top_logprobs without logprobs", CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    Case("truncate to no tokens", COMPLETIONS, completion(truncate_prompt_tokens=0), 400,
         "truncate_prompt_tokens"),
    Case("tokenize both prompt and messages", TOKENIZE,
         {"model": "tiny", "prompt": "a", "messages": USER}, 400, "prompt", message="one of them"),
    Case("tokenize neither", TOKENIZE, {"model": "tiny"}, 400, "prompt"),
    Case("tokenize tools without messages", TOKENIZE,
         {"model": "tiny", "prompt": "a", "tools": [tool("f")]}, 400, "tools"),
    Case("tokenize special tokens of a chat", TOKENIZE,
         {"model": "tiny", "messages": USER, "add_special_tokens": True}, 400,
         "add_special_tokens"),
    Case("tokenize an unknown model", TOKENIZE, {"model": "gpt-4", "prompt": "a"}, 404, "model"),
    Case("detokenize past the vocabulary", DETOKENIZE, {"model": "tiny", "tokens": [1, 99999]},
         400, "tokens.1", message="vocabulary"),
    Case("detokenize a negative id", DETOKENIZE, {"model": "tiny", "tokens": [-1]}, 400,
         "tokens.0"),
    Case("two structured outputs", COMPLETIONS,
         completion(structured_outputs={"regex": "a+"}, guided_choice=["a"]), 400,
         "guided_choice", message="one structured output constraint"),
    Case("structured output regex unclosed", CHAT, chat(structured_outputs={"regex": "("}), 400,
         "structured_outputs.regex", message="regex"),
    Case("structured output no choices", COMPLETIONS, completion(guided_choice=[]), 400,
         "guided_choice", message="at least one choice"),
    Case("structured output json not JSON", COMPLETIONS, completion(guided_json="{nope"), 400,
         "guided_json"),
    Case("structured output json not a schema object", CHAT,
         chat(structured_outputs={"json": "[1]"}), 400, "structured_outputs.json"),
    Case("structured output grammar broken", CHAT, chat(guided_grammar="start: ("), 400,
         "guided_grammar"),
    Case("structured output beside response_format", CHAT,
         chat(guided_choice=["a"], response_format={"type": "json_object"}), 400, "guided_choice",
         message="response_format"),
    Case("structured output beside tools", CHAT,
         chat(structured_outputs={"json_object": True}, tools=[tool("f")]), 400,
         "structured_outputs.json_object", message="tools"),
    Case("structured outputs unknown field", CHAT, chat(structured_outputs={"xml": "a"}), 400,
         "structured_outputs.xml"),
    Case("template kwargs naming the messages", CHAT, chat(chat_template_kwargs={"messages": []}),
         400, "chat_template_kwargs.messages", message="sets this template variable itself"),
    Case("template kwargs not an object", CHAT, chat(chat_template_kwargs=[1]), 400,
         "chat_template_kwargs"),
    Case("continue the last message and open a turn", CHAT,
         chat(continue_final_message=True, add_generation_prompt=True), 400,
         "continue_final_message", message="cannot be combined"),
    Case("continue an empty message", CHAT,
         chat(messages=[*USER, {"role": "assistant", "content": " "}], continue_final_message=True),
         400, "continue_final_message", message="no text to continue"),
    Case("presence penalty above 2", CHAT, chat(presence_penalty=2.5), 400, "presence_penalty"),
    Case("repetition penalty 0", COMPLETIONS, completion(repetition_penalty=0), 400,
         "repetition_penalty"),
    Case("repetition penalty negative", CHAT, chat(repetition_penalty=-1.0), 400,
         "repetition_penalty"),
    Case("logit bias key not a token id", CHAT, chat(logit_bias={"hello": 5}), 400,
         "logit_bias", message="token ids"),
    Case("logit bias key a digit Python's int refuses", CHAT, chat(logit_bias={"²": 5}), 400,
         "logit_bias", message="token ids"),
    Case("logit bias past 100", COMPLETIONS, completion(logit_bias={"5": 101}), 400,
         "logit_bias.5", message="[-100, 100]"),
    Case("logit bias past the vocabulary", COMPLETIONS, completion(logit_bias={"99999": 1}),
         400, message="outside [0, "),
    Case("tool of a type other than function", CHAT,
         chat(tools=[{"type": "retrieval", "function": {"name": "f"}}]), 400, "tools.0.type"),
    Case("tool name with a space", CHAT, chat(tools=[TOOL, tool("get weather")]), 400,
         "tools.1.function.name"),
    Case("two tools of one name", CHAT, chat(tools=[TOOL, TOOL]), 400, "tools.1.function.name",
         message="unique"),
    Case("tool parameters llguidance refuses", CHAT,
         chat(tools=[TOOL, tool("g", {"type": "objectx"})]), 400, "tools.1.function.parameters",
         message="objectx"),
    Case("tool parameters with a dangling reference", CHAT,
         chat(tools=[tool("g", {"properties": {"a": {"$ref": "#/$defs/none"}}})]), 400,
         "tools.0.function.parameters"),
    Case("tool_choice naming a function not among the tools", CHAT,
         chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "g"}}), 400,
         "tool_choice.function.name", message="not among the tools"),
    Case("tool_choice forcing a call without tools", CHAT, chat(tool_choice="required"), 400,
         "tool_choice"),
    Case("tool_choice of an unknown mode", CHAT, chat(tools=[TOOL], tool_choice="always"), 400,
         "tool_choice"),
    Case("tool_choice without its function", CHAT,
         chat(tools=[TOOL], tool_choice={"type": "function"}), 400, "tool_choice.function"),
    Case("a forced call together with response_format", CHAT,
         chat(tools=[TOOL], tool_choice="required", response_format={"type": "json_object"}),
         400, "response_format"),
    Case("tool message without tool_call_id", CHAT,
         chat(messages=[*USER, {"role": "tool", "content": "12 C"}]), 400,
         "messages.1.tool_call_id"),
    Case("tool calls on a user message", CHAT, chat(messages=[{"role": "user", "content": "x",
         "tool_calls": [CALL]}]), 400, "messages.0.tool_calls"),
    Case("tool call without arguments", CHAT, chat(messages=[*USER, {"role": "assistant",
         "tool_calls": [{**CALL, "function": {"name": "f"}}]}]), 400,
         "messages.1.tool_calls.0.function.arguments"),
    Case("response_format of an unknown type", CHAT, chat(response_format={"type": "xml"}), 400,
         "response_format.type"),
    Case("response_format json_schema without a name", CHAT,
         chat(response_format={"type": "json_schema", "json_schema": {"schema": {}}}), 400,
         "response_format.json_schema"),
    Case("response_format with a schema that is not one", CHAT,
         chat(response_format={"type": "json_schema",
                               "json_schema": {"name": "x", "schema": {"type": "objectx"}}}),
         400, "response_format.json_schema.schema", message="objectx"),
    Case("response_format with a schema that makes llguidance panic", CHAT,
         chat(response_format={"type": "json_schema", "json_schema": {
             "name": "x", "schema": {"required": {"k": "a" * 83 + "\U0007b574" * 3}}}}),
         400, "response_format.json_schema.schema", message="could not be compiled"),
    Case("response_format with a dangling reference", CHAT,
         chat(response_format={"type": "json_schema", "json_schema": {
             "name": "x", "schema": {"properties": {"a": {"$ref": "#/$defs/none"}}}}}),
         400, "response_format.json_schema.schema"),
    Case("stream_options without stream", CHAT, chat(stream_options={"include_usage": True}),
         400, "stream_options"),
    Case("huge body", COMPLETIONS, completion(prompt="x" * (9 << 20)), 413,
         code="request_too_large"),
    Case("wrong method", COMPLETIONS, b"", 405, method="GET"),
    Case("unknown route", "/v1/embeddings", completion(), 404, error_type="not_found_error"),
]  # fmt: skip


def send(client: httpx.Client, case: Case) -> httpx.Response:
    content = case.body if isinstance(case.body, bytes) else json.dumps(case.body).encode()
    headers = {"Content-Type": "application/json", **dict(case.headers)}
    return client.request(case.method, case.path, content=content, headers=headers)


@pytest.fixture(scope="module")
def client(served: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.base_url, timeout=60) as client:
        yield client


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_an_openai_error_and_the_server_serves_on(
    client: httpx.Client, case: Case
) -> None:
    response = send(client, case)
    assert response.status_code == case.status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["type"] == case.error_type
    if case.param is not None:
        assert error["param"] == case.param
    if case.code is not None:
        assert error["code"] == case.code
    if case.message is not None:
        assert case.message in error["message"]
    ok = client.post(COMPLETIONS, json=completion(max_tokens=1))
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] == 1


def test_huge_chunked_body_without_content_length_is_refused(client: httpx.Client) -> None:
    def body() -> Iterator[bytes]:
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(10):
            yield b"x" * (1 << 20)
        yield b'"}'

    response = client.post(
        COMPLETIONS, content=body(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert client.post(COMPLETIONS, json=completion(max_tokens=1)).status_code == 200


def test_streaming_request_with_bad_input_gets_a_status_not_a_broken_stream(
    client: httpx.Client,
) -> None:
    response = client.post(COMPLETIONS, json=completion(prompt=[10**9], stream=True))
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    assert (
        "vocab" in response.json()["error"]["message"]
        or "[0," in response.json()["error"]["message"]
    )
