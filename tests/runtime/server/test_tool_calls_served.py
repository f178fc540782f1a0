"""Tool calling over HTTP, with the tiny random model: forced calls are valid by construction
(greedy and sampled, streamed and not, n=2), calls the model writes are parsed out of its text,
a conversation with earlier calls and their results renders and is answered.

The tiny model's context (512 positions) is too short for tools described in a system message,
so these servers load a copy that says 2,048 (random weights have no trained length). Their
engine writes, for a user message ``SAY:TEXT::END``, exactly TEXT (a grammar of that one string
over the real model's choices, tokenizer and stream), so that the server's reading of calls a
model writes itself is exercised without a model that knows how to call.
"""

import dataclasses
import functools
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_harness import running_server
from tool_schemas import DIGIT, TOOLS, VALID

from berth.runtime.engine import EngineConfig, SamplingParams
from berth.runtime.server.engine_process import ServableEngine, load_engine

WEATHER = {"type": "function", "function": {"name": "get_weather"}}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]
CALL_ID = re.compile(r"call_[0-9a-f]{24}")
OSLO = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
# A Hermes-style template that renders tools, calls (arguments as objects) and tool results.
HERMES_TEMPLATE = (
    "{% if tools %}<|system|>Tools: <tools>{% for tool in tools %}{{ tool | tojson }}"
    '{% endfor %}</tools> Call as <tool_call>{"name": ..., "arguments": ...}</tool_call>\n'
    "{% endif %}{% for message in messages %}<|{{ message.role }}|>"
    "{% if message.content %}{{ message.content }}{% endif %}"
    '{% for call in message.tool_calls or [] %}<tool_call>{"name": "{{ call.function.name }}",'
    ' "arguments": {{ call.function.arguments | tojson }}}</tool_call>{% endfor %}\n'
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class ScriptedEngine:
    """The real engine; a request whose prompt holds ``SAY:TEXT::END`` must write TEXT. A
    request that comes with a grammar (the server's constraint) is refused with a
    ``ValueError``, a 400, where that grammar does not accept TEXT, so a test sees over HTTP
    what the server lets a model write."""

    def __init__(self, engine: ServableEngine) -> None:
        self._engine = engine

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        from llguidance import LLMatcher

        tokenizer = self._engine.tokenizer  # type: ignore[attr-defined]
        script = re.search(r"SAY:(.*?)::END", tokenizer.decode(prompt), re.S)
        if script is not None and params.grammar is not None:
            matcher = LLMatcher(grammar_index(tokenizer), params.grammar, log_level=0)
            ids = tokenizer.hf.encode(script.group(1), add_special_tokens=False).ids
            if not (matcher.consume_tokens(ids) and matcher.is_accepting()):
                raise ValueError("SCRIPT REFUSED by the request's grammar")
        if script is not None:
            lark = "start: " + json.dumps(script.group(1), ensure_ascii=False)
            params = dataclasses.replace(params, grammar=LLMatcher.grammar_from_lark(lark))
        self._engine.add_request(request_id, prompt, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


@functools.cache
def grammar_index(tokenizer: Any) -> Any:
    from llguidance import LLTokenizer

    return LLTokenizer(tokenizer.hf.to_str())


def scripted_engine(config: EngineConfig) -> ServableEngine:
    """The engine factory of these servers; it runs in the engine process."""
    return cast(ServableEngine, ScriptedEngine(load_engine(config)))


def served_copy(
    engine_config: EngineConfig,
    tiny_model: Path,
    out: Path,
    template: str | None,
    **settings: Any,
) -> Iterator[httpx.Client]:
    """A server of the tiny model saying 2,048 positions, with ``template`` as its chat
    template (None: the tiny model's own, which ignores tools) and server ``settings``."""
    shutil.copytree(tiny_model, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    if template is not None:
        tokenizer = json.loads((out / "tokenizer_config.json").read_text())
        (out / "tokenizer_config.json").write_text(json.dumps({**tokenizer,
                                                               "chat_template": template}))  # fmt: skip
    engine = dataclasses.replace(engine_config, model=str(out), num_kv_blocks=512)
    with (
        running_server(engine, functools.partial(scripted_engine, engine), **settings) as server,
        httpx.Client(base_url=server.base_url, timeout=120) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def plain(
    engine_config: EngineConfig, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    """The tiny model's template ignores tools: they are described in a system message."""
    yield from served_copy(engine_config, tiny_model, tmp_path_factory.mktemp("p") / "m", None)


@pytest.fixture(scope="module")
def hermes(
    engine_config: EngineConfig, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    out = tmp_path_factory.mktemp("h") / "m"
    yield from served_copy(engine_config, tiny_model, out, HERMES_TEMPLATE)


@pytest.fixture(scope="module")
def thinking(
    engine_config: EngineConfig, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    """A Hermes template and vLLM's qwen3 reasoning parser (``--reasoning-parser qwen3``)."""
    out = tmp_path_factory.mktemp("t") / "m"
    yield from served_copy(engine_config, tiny_model, out, HERMES_TEMPLATE,
                           reasoning_parser="qwen3")  # fmt: skip


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": ASK, "tools": TOOLS, "max_tokens": 120, **fields}


def collected(client: httpx.Client, **fields: Any) -> list[dict[str, Any]]:
    response = client.post("/v1/chat/completions", json=body(**fields))
    assert response.status_code == 200, response.text
    return response.json()["choices"]


def streamed(client: httpx.Client, **fields: Any) -> list[dict[str, Any]]:
    """The streamed choices put together as the collected ones look, checking on the way that
    a call's first fragment carries its id, type and name and later ones only arguments."""
    choices: dict[int, dict[str, Any]] = {}
    with client.stream("POST", "/v1/chat/completions", json=body(stream=True, **fields)) as r:
        assert r.status_code == 200, r.read()
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    for event in events:
        for choice in event["choices"]:
            into = choices.setdefault(choice["index"], {"index": choice["index"], "content": "",
                                                        "reasoning": "", "calls": {},
                                                        "finish_reason": None})  # fmt: skip
            delta = choice["delta"]
            if delta.get("reasoning_content"):
                assert not into["content"] and not into["calls"], "a thought after the answer"
                into["reasoning"] += delta["reasoning_content"]
            into["content"] += delta.get("content") or ""
            for call in delta.get("tool_calls", []):
                if call["index"] not in into["calls"]:
                    assert set(call) == {"index", "id", "type", "function"}, call
                    assert call["type"] == "function" and "name" in call["function"]
                    into["calls"][call["index"]] = {"id": call["id"], "type": "function",
                                                    "function": dict(call["function"])}  # fmt: skip
                else:
                    assert set(call) == {"index", "function"}
                    assert set(call["function"]) == {"arguments"}
                    into["calls"][call["index"]]["function"]["arguments"] += call["function"][
                        "arguments"
                    ]
            if choice["finish_reason"] is not None:
                into["finish_reason"] = choice["finish_reason"]
    out = []
    for index in sorted(choices):
        choice = choices[index]
        calls = [choice["calls"][i] for i in sorted(choice["calls"])]
        assert [i for i in sorted(choice["calls"])] == list(range(len(calls)))
        message: dict[str, Any] = {"role": "assistant"}
        if choice["reasoning"]:
            message["reasoning_content"] = choice["reasoning"]
        message["content"] = choice["content"] or (None if calls or choice["reasoning"] else "")
        if calls:
            message["tool_calls"] = calls
        out.append({"index": index, "message": message, "finish_reason": choice["finish_reason"]})
    return out


def calls_of(choice: dict[str, Any]) -> list[tuple[str, Any]]:
    """The choice's calls as (name, arguments), each checked to be OpenAI-shaped."""
    out = []
    for call in choice["message"].get("tool_calls") or []:
        assert CALL_ID.fullmatch(call["id"]) and call["type"] == "function", call
        out.append((call["function"]["name"], json.loads(call["function"]["arguments"])))
    return out


def valid_forced_choices(choices: list[dict[str, Any]], max_calls: int | None = None) -> None:
    for choice in choices:
        assert choice["finish_reason"] == "tool_calls", choice
        assert choice["message"]["content"] is None
        calls = calls_of(choice)
        assert calls and (max_calls is None or len(calls) <= max_calls)
        for name, arguments in calls:
            assert VALID[name].is_valid(arguments), (name, arguments)


@pytest.mark.parametrize(("temperature", "seed"), [(0.0, None), (1.0, 11)])
def test_a_named_call_is_valid_under_its_schema_streamed_or_not(
    plain: httpx.Client, temperature: float, seed: int | None
) -> None:
    fields = {"tool_choice": WEATHER, "n": 2, "temperature": temperature, "seed": seed}
    whole = collected(plain, **fields)
    valid_forced_choices(whole, max_calls=1)
    assert all(calls_of(c)[0][0] == "get_weather" for c in whole)
    parts = streamed(plain, **fields)
    valid_forced_choices(parts, max_calls=1)
    strip_ids = [[c["function"] for c in choice["message"]["tool_calls"]] for choice in whole]
    assert [[c["function"] for c in ch["message"]["tool_calls"]] for ch in parts] == strip_ids


@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_are_valid_calls_of_the_tools_streamed_or_not(
    plain: httpx.Client, parallel: bool
) -> None:
    fields = {"tool_choice": "required", "parallel_tool_calls": parallel, "n": 2,
              "temperature": 1.0, "seed": 5, "max_tokens": 300}  # fmt: skip
    for choices in (collected(plain, **fields), streamed(plain, **fields)):
        valid_forced_choices(choices, max_calls=None if parallel else 1)
    # Greedy, a random model may repeat calls until max_tokens: the calls before the cut
    # are whole, and the finish reason says it was cut.
    (greedy,) = collected(plain, **{**fields, "temperature": 0.0, "n": 1, "max_tokens": 100})
    if greedy["finish_reason"] == "tool_calls":
        valid_forced_choices([greedy], max_calls=None if parallel else 1)
    else:
        assert greedy["finish_reason"] == "length" and parallel
        calls = greedy["message"]["tool_calls"]
        for call in calls[:-1]:
            name, arguments = call["function"]["name"], call["function"]["arguments"]
            assert VALID[name].is_valid(json.loads(arguments))


@pytest.mark.parametrize("server", ["plain", "hermes"])
def test_calls_the_model_writes_are_parsed_out_of_its_text_streamed_or_not(
    server: str, request: pytest.FixtureRequest
) -> None:
    client: httpx.Client = request.getfixturevalue(server)
    script = [{"role": "user", "content": f"SAY:Let me look.\n{OSLO}::END"}]
    fields = {"messages": script, "n": 2, "logprobs": True}
    for choices in (collected(client, **fields), streamed(client, **fields)):
        for choice in choices:
            assert choice["message"]["content"] == "Let me look."
            assert calls_of(choice) == [("get_weather", {"city": "Oslo"})]
            assert choice["finish_reason"] == "tool_calls"


def test_text_that_is_no_call_and_tool_choice_none_leave_the_text_as_it_was(
    plain: httpx.Client,
) -> None:
    unknown = OSLO.replace("get_weather", "get_tide")
    for text, fields in [(unknown, {}), (OSLO, {"tool_choice": "none"})]:
        script = [{"role": "user", "content": f"SAY:{text}::END"}]
        for choices in (collected(plain, messages=script, **fields),
                        streamed(plain, messages=script, **fields)):  # fmt: skip
            assert choices[0]["message"] == {"role": "assistant", "content": text}
            assert choices[0]["finish_reason"] == "stop"


def test_without_parallel_calls_a_second_call_stays_text(plain: httpx.Client) -> None:
    second = OSLO.replace("Oslo", "Rome")
    script = [{"role": "user", "content": f"SAY:{OSLO}\n{second}::END"}]
    for choices in (collected(plain, messages=script, parallel_tool_calls=False),
                    streamed(plain, messages=script, parallel_tool_calls=False)):  # fmt: skip
        assert calls_of(choices[0]) == [("get_weather", {"city": "Oslo"})]
        assert choices[0]["message"]["content"] == second


def strict(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**t, "function": {**t["function"], "strict": True}} for t in tools]


def said(client: httpx.Client, text: str, **fields: Any) -> httpx.Response:
    script = [{"role": "user", "content": f"SAY:{text}::END"}]
    return client.post("/v1/chat/completions", json=body(messages=script, **fields))


@pytest.mark.parametrize("server", ["plain", "hermes"])
def test_strict_tools_keep_calls_the_model_chooses_to_make_valid_and_leave_prose_free(
    server: str, request: pytest.FixtureRequest
) -> None:
    """``strict``: a call the model begins must name a tool and follow its schema; the text
    around calls stays free. Without ``strict`` the same text is served as written."""
    client: httpx.Client = request.getfixturevalue(server)
    far = OSLO.replace("Oslo", "Oslo and far beyond")  # past the schema's maxLength 10
    tide = OSLO.replace("get_weather", "get_tide")
    for text in ("It is sunny.", f"Let me look.\n{OSLO}", f"{OSLO}\nDone."):
        choice = said(client, text, tools=strict(TOOLS)).json()["choices"][0]
        assert [c[0] for c in calls_of(choice)] == (["get_weather"] if OSLO in text else [])
    for text in (far, tide, f"{OSLO}\n{far}"):
        refused = said(client, text, tools=strict(TOOLS))
        assert refused.status_code == 400 and "SCRIPT REFUSED" in refused.text, refused.text
        served = said(client, text, tools=TOOLS)
        assert served.status_code == 200, served.text
    # One strict tool is enough to constrain calls; the others' arguments are any object.
    mixed = [*strict(TOOLS[:1]), {"type": "function", "function": {"name": "pick"}}]
    pick = OSLO.replace("get_weather", "pick")
    assert calls_of(said(client, pick, tools=mixed).json()["choices"][0]) == [
        ("pick", {"city": "Oslo"})
    ]
    assert said(client, far, tools=mixed).status_code == 400


def test_tools_beside_a_response_format_answer_in_the_format_or_call(
    plain: httpx.Client,
) -> None:
    """``response_format`` with ``auto`` tools: the message is the format's JSON or calls,
    never prose, so neither is dropped (before, the format's grammar left no way to call)."""
    answer = {"type": "json_schema", "json_schema": {"name": "a", "schema": DIGIT}}
    fields = {"tools": TOOLS, "response_format": answer}
    content = said(plain, '{"n": 3}', **fields).json()["choices"][0]
    assert content["message"]["content"] == '{"n": 3}' and content["finish_reason"] == "stop"
    call = said(plain, OSLO, **fields).json()["choices"][0]
    assert calls_of(call) == [("get_weather", {"city": "Oslo"})]
    for text in ("It is sunny.", '{"n": 12}', f"Let me look.\n{OSLO}"):
        assert "SCRIPT REFUSED" in said(plain, text, **fields).text
    # tool_choice "none": the format alone.
    assert "SCRIPT REFUSED" in said(plain, OSLO, tool_choice="none", **fields).text


@pytest.mark.parametrize("server", ["plain", "hermes"])
def test_a_conversation_with_calls_and_their_results_renders_and_is_answered(
    server: str, request: pytest.FixtureRequest
) -> None:
    client: httpx.Client = request.getfixturevalue(server)
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}  # fmt: skip
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "12 C and rain"}]  # fmt: skip
    fields = {"max_tokens": 4, "temperature": 0.0}
    before = client.post("/v1/chat/completions", json=body(**fields)).json()
    after = client.post("/v1/chat/completions", json=body(messages=history, **fields))
    assert after.status_code == 200, after.text
    answer = after.json()
    assert isinstance(answer["choices"][0]["message"]["content"], str)
    # The call and its result are in the prompt (as written by the template or the fallback).
    grown = answer["usage"]["prompt_tokens"] - before["usage"]["prompt_tokens"]
    assert grown > len("get_weather Oslo 12 C and rain") // 4


def test_free_text_with_tools_streams_what_it_collects(plain: httpx.Client) -> None:
    fields = {"temperature": 0.0, "max_tokens": 40, "n": 2}
    whole, parts = collected(plain, **fields), streamed(plain, **fields)
    assert whole == [{**c, "logprobs": None} for c in parts]
    assert whole[0]["finish_reason"] in ("stop", "length")


SCHEMA_KEYS = ["type", "properties", "required", "items", "enum", "const", "minimum",
               "maxLength", "$ref", "anyOf", "additionalProperties", "$defs", "pattern"]  # fmt: skip
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.sampled_from(
        ["object", "string", "integer", "#", "#/$defs/a", "a", "^x+$", "array"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from([*SCHEMA_KEYS, "a", "city"]), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    parameters=st.dictionaries(st.sampled_from(SCHEMA_KEYS), JSON_VALUES, max_size=4),
    choice=st.sampled_from(["auto", "required", "none", WEATHER]),
    is_strict=st.booleans(),
)
def test_any_parameters_schema_is_served_or_refused_naming_it_never_a_5xx(
    plain: httpx.Client, parameters: dict[str, Any], choice: Any, is_strict: bool
) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": parameters}}]
    tools = strict(tools) if is_strict else tools
    response = plain.post("/v1/chat/completions", json=body(tools=tools, tool_choice=choice,
                                                            max_tokens=8))  # fmt: skip
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert response.json()["error"]["param"] == "tools.0.function.parameters"


def test_a_thought_goes_to_reasoning_content_and_calls_are_read_after_it(
    thinking: httpx.Client,
) -> None:
    """With the qwen3 parser, what a thinking model writes between <think> and </think> is the
    answer's reasoning_content (streamed as delta.reasoning_content, before the rest), and the
    calls are read from the rest, streamed or not."""
    thought = "\nThe user wants Oslo's weather: call the tool.\n"
    script = [{"role": "user", "content": f"SAY:<think>{thought}</think>\n\n{OSLO}::END"}]
    for parts in (collected, streamed):
        (choice,) = parts(thinking, messages=script)
        assert choice["message"]["reasoning_content"] == thought, parts
        assert calls_of(choice) == [("get_weather", {"city": "Oslo"})]
        assert choice["finish_reason"] == "tool_calls"
    answer = [{"role": "user", "content": "SAY:<think>Rain, as ever.</think>It rains.::END"}]
    for parts in (collected, streamed):
        (choice,) = parts(thinking, messages=answer, tools=None)
        message = choice["message"]
        assert (message["reasoning_content"], message["content"]) == ("Rain, as ever.", "It rains.")
    # No thought opened at the start (Qwen3 with enable_thinking off): all of it is the answer
    plain_answer = [{"role": "user", "content": "SAY:It rains. <think> is a tag.::END"}]
    (choice,) = collected(thinking, messages=plain_answer, tools=None)
    assert choice["message"] == {"role": "assistant", "content": "It rains. <think> is a tag."}
    # A thought cut by max_tokens is all reasoning: the content is null
    cut = [{"role": "user", "content": "SAY:<think>" + "Rain and more rain. " * 20 + "::END"}]
    for parts in (collected, streamed):
        (choice,) = parts(thinking, messages=cut, tools=None, max_tokens=12)
        assert choice["finish_reason"] == "length"
        message = choice["message"]
        assert message["content"] is None and message["reasoning_content"].startswith("Rain")


def test_a_thought_comes_before_a_structured_answer(thinking: httpx.Client) -> None:
    """With the reasoning parser, response_format and structured_outputs constrain what
    follows the thought (which stays free): a thought then valid JSON, or valid JSON alone,
    is written and read back split; an answer that breaks the schema after the thought is
    refused by the grammar (the scripted engine's 400)."""
    schema = {"type": "object", "properties": {"tag": {"enum": ["quay", "berth"]}},
              "required": ["tag"], "additionalProperties": False}  # fmt: skip
    formats: list[dict[str, Any]] = [
        {"response_format": {"type": "json_schema",
                             "json_schema": {"name": "t", "schema": schema}}},
        {"structured_outputs": {"json": schema}},
    ]  # fmt: skip
    for fields in formats:
        for script, thought in (
            ('<think>\nQuay or berth?\n</think>\n\n{"tag": "quay"}', "\nQuay or berth?\n"),
            ('{"tag": "berth"}', None),
        ):
            said = [{"role": "user", "content": f"SAY:{script}::END"}]
            for parts in (collected, streamed):
                (choice,) = parts(thinking, messages=said, tools=None, **fields)
                message = choice["message"]
                assert message.get("reasoning_content") == thought, (fields, script)
                assert json.loads(message["content"])["tag"] in ("quay", "berth")
        broken = [{"role": "user", "content": 'SAY:<think>hm</think>{"tag": "dock"}::END'}]
        response = thinking.post("/v1/chat/completions",
                                 json=body(messages=broken, tools=None, **fields))  # fmt: skip
        assert response.status_code == 400 and "SCRIPT REFUSED" in response.text
    choice_fields = {"structured_outputs": {"choice": ["yes", "no"]}}
    said = [{"role": "user", "content": "SAY:<think>Is it?</think>no::END"}]
    (choice,) = collected(thinking, messages=said, tools=None, **choice_fields)
    assert (choice["message"]["reasoning_content"], choice["message"]["content"]) == (
        "Is it?",
        "no",
    )
