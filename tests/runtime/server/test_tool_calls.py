"""Tool calls, pure: reading calls out of text in any chunking, the schema that forces a call,
the request's tool choice and the conversation as templates take it."""

import itertools
import json
import re
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llguidance import LLMatcher, LLTokenizer

from berth.runtime.engine.grammar import json_schema_grammar
from berth.runtime.engine.tokenizer import Tokenizer
from berth.runtime.server.errors import APIError
from berth.runtime.server.protocol import ChatCompletionRequest, MessageToolCall
from berth.runtime.server.tool_calls import (
    WHITESPACE,
    CallDelta,
    CallReader,
    ForcedReader,
    HermesReader,
    LlamaReader,
    format_calls,
    merged,
    new_call_id,
)
from berth.runtime.server.tools import (
    ToolPlan,
    call_format,
    described_in_system,
    renders_tools,
    template_tool_calls,
    tool_plan,
)

NAMES = frozenset({"get_weather", "book_berth", "f-1"})
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20},
                   "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city"],
    "additionalProperties": False,
}  # fmt: skip
BERTH = {
    "type": "object",
    "properties": {"ship": {"type": "string"}, "length_m": {"type": "integer", "minimum": 1}},
    "required": ["ship", "length_m"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "book_berth", "description": "Book a berth.",
                                      "parameters": BERTH}},
    {"type": "function", "function": {"name": "f-1"}},
]  # fmt: skip

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(10**9), 10**9)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
ARGUMENTS = st.dictionaries(st.text(max_size=8), JSON, max_size=4)
CALLS = st.lists(st.tuples(st.sampled_from(sorted(NAMES)), ARGUMENTS), min_size=1, max_size=3)
# Text made of what calls are made of, so that junk comes near to being calls.
JUNK = st.lists(
    st.sampled_from([*'{}[]",:;/<>\\ \n', "<tool_call>", "</tool_call>", '"name"',
                     '"arguments"', '"parameters"', '"get_weather"', "1", "<|python_tag|>",
                     "é", "x"]),
    max_size=40,
).map("".join)  # fmt: skip


def request(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate(body)


def read(reader: CallReader, text: str, cuts: list[int] | None = None) -> tuple[str, list[Any]]:
    """Feed ``text`` cut at ``cuts``; the content and the calls as (name, arguments text)."""
    bounds = [0, *sorted(set(cuts or [])), len(text)]
    pieces = [reader.feed(text[a:b]) for a, b in itertools.pairwise(bounds)]
    pieces.append(reader.finish())
    content = "".join(p.content for p in pieces)
    calls = merged([d for p in pieces for d in p.calls])
    assert all(c.id is not None and re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in calls)
    assert [c.index for c in calls] == list(range(len(calls)))
    return content, [(c.name, c.arguments) for c in calls]


def parsed(calls: list[tuple[str | None, str]]) -> list[tuple[str | None, Any]]:
    return [(name, json.loads(arguments)) for name, arguments in calls]


def cut_points(text: str) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, len(text)), max_size=8)


@given(calls=CALLS, data=st.data())
def test_hermes_calls_round_trip_through_their_format_in_any_chunking(
    calls: list[tuple[str, dict[str, Any]]], data: st.DataObject
) -> None:
    text = format_calls(calls, "hermes")
    content, read_calls = read(HermesReader(NAMES), text, data.draw(cut_points(text)))
    assert content == "" and parsed(read_calls) == calls


@given(calls=CALLS, data=st.data())
def test_llama_calls_round_trip_through_their_format_in_any_chunking(
    calls: list[tuple[str, dict[str, Any]]], data: st.DataObject
) -> None:
    text = "<|python_tag|>" * data.draw(st.integers(0, 1)) + format_calls(calls, "llama")
    content, read_calls = read(LlamaReader(NAMES), text, data.draw(cut_points(text)))
    assert content == "" and parsed(read_calls) == calls


@given(
    before=st.text(max_size=30).filter(lambda t: "<tool_call>" not in t),
    after=st.text(max_size=30).filter(lambda t: "<tool_call>" not in t),
    calls=CALLS,
    data=st.data(),
)
def test_text_around_hermes_calls_is_the_content_without_the_whitespace_beside_the_calls(
    before: str, after: str, calls: list[tuple[str, dict[str, Any]]], data: st.DataObject
) -> None:
    text = before + format_calls(calls, "hermes") + after
    content, read_calls = read(HermesReader(NAMES), text, data.draw(cut_points(text)))
    assert parsed(read_calls) == calls
    assert content == before.rstrip(WHITESPACE) + after.lstrip(WHITESPACE)


@settings(max_examples=300)
@given(text=JUNK, data=st.data())
def test_any_text_reads_the_same_in_any_chunking_and_unchanged_when_it_holds_no_call(
    text: str, data: st.DataObject
) -> None:
    cuts = data.draw(cut_points(text))
    for make in (lambda: HermesReader(NAMES), lambda: LlamaReader(NAMES),
                 lambda: HermesReader(NAMES, 1)):  # fmt: skip
        whole, streamed = make(), make()
        assert read(whole, text) == read(streamed, text, cuts)
        if whole.calls == 0:
            assert read(make(), text)[0] == text
        assert whole.complete


@settings(max_examples=300)
@given(text=JUNK, data=st.data())
def test_forced_readers_never_raise_and_read_the_same_in_any_chunking(
    text: str, data: st.DataObject
) -> None:
    cuts = data.draw(cut_points(text))
    for name, parallel in (("get_weather", True), (None, True), (None, False)):
        whole, streamed = ForcedReader(name, parallel), ForcedReader(name, parallel)
        assert read(whole, text) == read(streamed, text, cuts)
        assert whole.complete == streamed.complete
    broken = ForcedReader(None, True)
    read(broken, '[{"name": "get_weather", "arguments": }' + text)
    assert not broken.complete


def test_calls_of_unknown_functions_or_with_arguments_that_are_no_object_stay_content() -> None:
    for body in ('{"name": "rm_rf", "arguments": {}}', '{"name": "get_weather", "arguments": 3}',
                 '{"name": "get_weather", "arguments": {"city": "Par', '{"name": ["get_weather"]}',
                 '{"name": "get_weather", "arguments": {"x": NaN}}', "[1, 2]"):  # fmt: skip
        text = f"Let me check.\n<tool_call>\n{body}\n</tool_call>"
        assert read(HermesReader(NAMES), text) == (text, [])
        assert read(LlamaReader(NAMES), body) == (body, [])


def test_arguments_written_as_a_json_string_are_read_as_the_object_they_hold() -> None:
    text = '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>'
    assert parsed(read(HermesReader(NAMES), text)[1]) == [("get_weather", {"city": "Oslo"})]


def test_a_call_without_its_closing_tag_counts_when_the_output_ends_after_its_json() -> None:
    text = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
    content, calls = read(HermesReader(NAMES), text)
    assert content == "Checking." and parsed(calls) == [("get_weather", {"city": "Oslo"})]


def test_text_that_may_begin_a_call_is_held_back_and_text_before_it_streams() -> None:
    reader = HermesReader(NAMES)
    assert reader.feed("The weather: \n<tool").content == "The weather:"
    assert not reader.feed('_call>\n{"name": "get_weather", "arguments": {"city"')
    piece = reader.feed(': "Oslo"}}\n</tool_call>\n\n')
    assert piece.content == "" and parsed([(c.name, c.arguments) for c in piece.calls]) == [
        ("get_weather", {"city": "Oslo"})
    ]
    assert reader.feed("  Done.").content == "Done."
    assert reader.feed(" <to").content == ""  # held: "<to" may begin another call
    assert reader.finish().content == " <to"


def test_llama_text_that_does_not_open_with_a_call_streams_at_once() -> None:
    reader = LlamaReader(NAMES)
    assert reader.feed("  ").content == ""
    assert reader.feed("Paris is").content == "  Paris is"
    assert reader.feed(' {"name": "get_weather"}').content == ' {"name": "get_weather"}'
    opening = LlamaReader(NAMES)
    assert not opening.feed('{"name": "get_weather", "parameters": {"city": "Os')
    piece = opening.feed('lo"}} and more')
    assert piece.content == "and more" and piece.calls[0].name == "get_weather"


def test_without_parallel_calls_only_the_first_call_is_taken() -> None:
    calls = [("get_weather", {"city": "Oslo"}), ("book_berth", {"ship": "A", "length_m": 9})]
    hermes = format_calls(calls, "hermes")
    content, read_calls = read(HermesReader(NAMES, max_calls=1), hermes)
    assert parsed(read_calls) == calls[:1] and content == format_calls(calls[1:], "hermes")
    content, read_calls = read(LlamaReader(NAMES, max_calls=1), format_calls(calls, "llama"))
    assert parsed(read_calls) == calls[:1] and content == format_calls(calls[1:], "llama")


WS = st.text(alphabet=WHITESPACE, max_size=3)


@st.composite
def forced_output(draw: st.DrawFn, parallel: bool) -> tuple[str, list[tuple[str, str]]]:
    """A forced call's output as a grammar may write it (whitespace between JSON tokens, as
    JSON_WHITESPACE allows), and its calls with their arguments' text."""
    calls = draw(CALLS if parallel else CALLS.map(lambda c: c[:1]))
    written = []
    texts = []
    for name, arguments in calls:
        indent = draw(st.sampled_from([None, 0, 2]))
        args = json.dumps(arguments, indent=indent, ensure_ascii=draw(st.booleans()))
        texts.append((name, args))
        w = [draw(WS) for _ in range(8)]
        written.append(f'{{{w[0]}"name"{w[1]}:{w[2]}{json.dumps(name)}{w[3]},{w[4]}"arguments"'
                       f"{w[5]}:{w[6]}{args}{w[7]}}}")  # fmt: skip
    if not parallel:
        return written[0], texts
    separators = [draw(WS) + "," + draw(WS) for _ in written[1:]]
    body = written[0] + "".join(s + w for s, w in zip(separators, written[1:], strict=True))
    return "[" + draw(WS) + body + draw(WS) + "]", texts


@given(parallel=st.booleans(), data=st.data())
def test_forced_calls_stream_their_arguments_text_as_written_in_any_chunking(
    parallel: bool, data: st.DataObject
) -> None:
    text, calls = data.draw(forced_output(parallel))
    reader = ForcedReader(None, parallel)
    assert read(reader, text, data.draw(cut_points(text))) == ("", calls)
    assert reader.complete


@given(arguments=ARGUMENTS, lead=WS, data=st.data())
def test_a_named_call_streams_the_whole_output_as_its_arguments(
    arguments: dict[str, Any], lead: str, data: st.DataObject
) -> None:
    text = lead + json.dumps(arguments)
    reader = ForcedReader("get_weather")
    assert read(reader, text, data.draw(cut_points(text))) == (
        "",
        [("get_weather", json.dumps(arguments))],
    )
    assert reader.complete


@given(parallel=st.booleans(), data=st.data())
def test_a_forced_output_cut_short_gives_the_calls_so_far_incomplete(
    parallel: bool, data: st.DataObject
) -> None:
    """A cut (max_tokens, a stop string) leaves calls whose arguments are a prefix of what
    they would have been, and the reader says the output is not complete."""
    text, calls = data.draw(forced_output(parallel))
    cut = data.draw(st.integers(0, len(text.rstrip(WHITESPACE)) - 1))
    reader = ForcedReader(None, parallel)
    content, got = read(reader, text[:cut])
    assert content == "" and not reader.complete
    assert len(got) <= len(calls)
    for (name, arguments), (full_name, full_arguments) in zip(got, calls, strict=False):
        assert name == full_name and full_arguments.startswith(arguments)


def test_call_ids_are_openai_shaped_and_unique() -> None:
    ids = {new_call_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)


def test_fragments_of_one_call_merge_and_a_new_call_starts_a_new_entry() -> None:
    deltas = [CallDelta(0, "call_a", "f", ""), CallDelta(0, arguments='{"a"'),
              CallDelta(0, arguments=": 1}"), CallDelta(1, "call_b", "g", "{}")]  # fmt: skip
    assert merged(deltas) == [
        CallDelta(0, "call_a", "f", '{"a": 1}'),
        CallDelta(1, "call_b", "g", "{}"),
    ]


# The forced call's schema.


def accepts(tokenizer: LLTokenizer, schema: dict[str, Any], text: str) -> bool:
    """Whether llguidance's grammar of ``schema`` takes ``text`` whole."""
    matcher = LLMatcher(tokenizer, json_schema_grammar(schema), log_level=0)
    tokens = tokenizer.tokenize_str(text)
    return matcher.try_consume_tokens(tokens) == len(tokens) and matcher.is_accepting()


@pytest.fixture(scope="module")
def lltokenizer(tiny_model: Path) -> LLTokenizer:
    hf = Tokenizer(tiny_model).hf
    return LLTokenizer(hf.to_str(), n_vocab=hf.get_vocab_size(), eos_token=[0])


def plan(**fields: Any) -> ToolPlan:
    found = tool_plan(request(tools=TOOLS, **fields))
    assert found is not None
    return found


def test_a_required_call_is_an_array_of_name_and_arguments_of_any_tool(
    lltokenizer: LLTokenizer,
) -> None:
    schema = plan(tool_choice="required").forced_schema()
    assert schema is not None
    validator = jsonschema_rs.validator_for(schema)
    good = [{"name": "get_weather", "arguments": {"city": "Oslo"}},
            {"name": "book_berth", "arguments": {"ship": "Ever Given", "length_m": 400}},
            {"name": "f-1", "arguments": {}}]  # fmt: skip
    bad = [[], [{"name": "get_weather", "arguments": {"ship": "x"}}],
           [{"name": "rm", "arguments": {}}], [{"name": "f-1", "arguments": {"x": 1}}],
           {"name": "f-1", "arguments": {}}]  # fmt: skip
    assert validator.is_valid(good) and not any(validator.is_valid(b) for b in bad)
    assert accepts(lltokenizer, schema, json.dumps(good))
    assert not any(accepts(lltokenizer, schema, json.dumps(b)) for b in bad)
    # The name comes first, so that a stream can name a call before its arguments.
    assert not accepts(lltokenizer, schema, '[{"arguments": {}, "name": "f-1"}]')


def test_a_required_call_without_parallel_calls_is_one_object(lltokenizer: LLTokenizer) -> None:
    schema = plan(tool_choice="required", parallel_tool_calls=False).forced_schema()
    assert schema is not None
    one = {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}
    assert accepts(lltokenizer, schema, json.dumps(one))
    assert not accepts(lltokenizer, schema, json.dumps([one]))


def test_a_named_call_follows_its_function_parameters(lltokenizer: LLTokenizer) -> None:
    named = plan(tool_choice={"type": "function", "function": {"name": "book_berth"}})
    assert named.forced_schema() == BERTH
    no_parameters = plan(tool_choice={"type": "function", "function": {"name": "f-1"}})
    schema = no_parameters.forced_schema()
    assert schema is not None
    assert accepts(lltokenizer, schema, "{}") and not accepts(lltokenizer, schema, '{"a": 1}')
    assert plan(tool_choice="auto").forced_schema() is None


def test_references_inside_a_tool_schema_still_resolve_when_it_is_one_of_several(
    lltokenizer: LLTokenizer,
) -> None:
    """A tool's ``$defs`` and a recursive ``#`` are relocated under the combined schema."""
    tree = {"$defs": {"Leaf": {"type": "integer", "maximum": 9}}, "type": "object",
            "properties": {"v": {"$ref": "#/$defs/Leaf"}, "kids": {"type": "array",
                           "items": {"$ref": "#"}, "maxItems": 2}},
            "required": ["v"], "additionalProperties": False,
            "default": {"$ref": "#/not/a/reference"}}  # fmt: skip
    tools = [*TOOLS, {"type": "function", "function": {"name": "tree", "parameters": tree}}]
    found = tool_plan(request(tools=tools, tool_choice="required"))
    assert found is not None
    schema = found.forced_schema()
    assert schema is not None
    assert schema["$defs"]["berth_tool_3"]["default"] == {"$ref": "#/not/a/reference"}
    call = [{"name": "tree", "arguments": {"v": 1, "kids": [{"v": 2, "kids": [{"v": 3}]}]}}]
    wrong = [{"name": "tree", "arguments": {"v": 1, "kids": [{"v": 12}]}}]
    validator = jsonschema_rs.validator_for(schema)
    assert validator.is_valid(call) and not validator.is_valid(wrong)
    assert accepts(lltokenizer, schema, json.dumps(call))
    assert not accepts(lltokenizer, schema, json.dumps(wrong))


# The request's tool choice.


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [], "tool_choice": {"type": "function", "function": {"name": "f-1"}}},
         "tool_choice"),
        ({"tools": [*TOOLS, TOOLS[0]]}, "tools.3.function.name"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice.function.name"),
    ],
)  # fmt: skip
def test_a_tool_choice_that_cannot_be_served_is_a_400_naming_the_field(
    fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(APIError) as error:
        tool_plan(request(**fields))
    assert error.value.status == 400 and error.value.param == param


def test_tool_choice_defaults_to_auto_and_parallel_calls_to_true() -> None:
    assert tool_plan(request()) is None
    assert tool_plan(request(tools=[])) is None
    # "none" and "auto" without tools ask nothing: accepted, as vLLM does
    assert tool_plan(request(tool_choice="none")) is None
    assert tool_plan(request(tools=[], tool_choice="auto")) is None
    default = plan()
    assert (default.mode, default.parallel, default.names) == ("auto", True, NAMES)
    named = plan(tool_choice={"type": "function", "function": {"name": "f-1"}},
                 parallel_tool_calls=False)  # fmt: skip
    assert (named.mode, named.name, named.parallel) == ("named", "f-1", False)
    assert plan(tool_choice="none").reader("hermes") is None


# The conversation as templates take it.


HERMES_TEMPLATE = (
    "{% if tools %}<|system|>Tools:<tools>{% for tool in tools %}\n{{ tool | tojson }}"
    '{% endfor %}</tools> Answer with <tool_call>{"name": ..., "arguments": ...}</tool_call>'
    "\n{% endif %}{% for message in messages %}<|{{ message.role }}|>"
    "{% if message.content %}{{ message.content }}{% endif %}"
    '{% for call in message.tool_calls or [] %}<tool_call>{"name": "{{ call.function.name }}",'
    ' "arguments": {{ call.function.arguments | tojson }}}</tool_call>{% endfor %}\n'
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
LLAMA_TEMPLATE = (
    "{% for message in messages %}{% if message.role == 'tool' %}<|ipython|>"
    "{% else %}<|{{ message.role }}|>{% endif %}{{ message.content }}{% endfor %}"
    '{% if tools %}Respond with {"name": function name, "parameters": arguments}.'
    "{% for tool in tools %}{{ tool | tojson }}{% endfor %}{% endif %}"
)
IGNORING_TEMPLATE = "{% for message in messages %}{{ message.content }}{% endfor %}"


def tokenizer_with(tiny_model: Path, template: str) -> Tokenizer:
    tokenizer = Tokenizer(tiny_model)
    tokenizer.chat_template = template
    return tokenizer


def test_the_call_format_follows_the_template_family(tiny_model: Path) -> None:
    broken = "{{ raise_exception('no tools here') if tools else '' }}{{ messages[0].content }}"
    for template, renders, style in [(HERMES_TEMPLATE, True, "hermes"),
                                     (LLAMA_TEMPLATE, True, "llama"),
                                     (IGNORING_TEMPLATE, False, "hermes"),
                                     (broken, False, "hermes")]:  # fmt: skip
        tokenizer = tokenizer_with(tiny_model, template)
        assert renders_tools(tokenizer) is renders
        assert call_format(tokenizer.chat_template, renders) == style


def test_a_round_trip_reaches_a_tools_template_with_arguments_as_objects(tiny_model: Path) -> None:
    calls = [MessageToolCall.model_validate({"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Oslo"}'}})]  # fmt: skip
    assert template_tool_calls(calls)[0]["function"]["arguments"] == {"city": "Oslo"}
    cut = calls[0].model_copy(update={"function": calls[0].function.model_copy(
        update={"arguments": '{"city": "Os'})})  # fmt: skip
    assert template_tool_calls([cut])[0]["function"]["arguments"] == '{"city": "Os'
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": template_tool_calls(calls)},
        {"role": "tool", "content": "12 C", "tool_call_id": "call_1"},
    ]
    text = tokenizer_with(tiny_model, HERMES_TEMPLATE).apply_chat_template(
        messages, tools=plan().template_tools()
    )
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' in text
    assert '"name": "f-1", "parameters": {"type": "object", "properties": {}}' in text
    assert "<|tool|>12 C" in text and text.endswith("<|assistant|>")


def test_a_template_that_ignores_tools_gets_them_in_the_system_message() -> None:
    calls = [
        {"id": f"call_{i}", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": city}}}
        for i, city in enumerate(["Oslo", "Rome"])
    ]  # fmt: skip
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "content": "12 C", "tool_call_id": "call_0"},
        {"role": "tool", "content": "25 C", "tool_call_id": "call_1"},
    ]
    out = described_in_system(messages, plan())
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n# Tools")
    assert json.dumps(plan().template_tools()[1]) in out[0]["content"]
    assert read(HermesReader(NAMES), out[2]["content"]) == ("", [
        ("get_weather", '{"city": "Oslo"}'), ("get_weather", '{"city": "Rome"}')])  # fmt: skip
    assert out[3]["content"] == (
        "<tool_response>\n12 C\n</tool_response>\n<tool_response>\n25 C\n</tool_response>"
    )
    assert all(set(m) == {"role", "content"} for m in out)
    without_system = described_in_system(messages[1:2], plan())
    assert without_system[0]["role"] == "system" and without_system[1] == messages[1]
