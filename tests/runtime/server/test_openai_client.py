"""The official ``openai`` client, streaming and not, against a real server and engine."""

import json
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageFunctionToolCall
from server_harness import RunningServer

GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


@pytest.fixture
def client(served: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model_with_its_context_length(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].model_extra == {"max_model_len": 512}


def test_completion_returns_max_tokens_tokens_and_usage(client: openai.OpenAI) -> None:
    result = client.completions.create(model="tiny", prompt="The harbour", max_tokens=7, **GREEDY)
    assert result.object == "text_completion"
    assert result.choices[0].finish_reason == "length"
    assert result.choices[0].text
    assert result.usage is not None
    assert result.usage.completion_tokens == 7
    assert result.usage.prompt_tokens > 0
    assert result.usage.total_tokens == result.usage.prompt_tokens + 7


def test_streamed_completion_concatenates_to_the_collected_text(client: openai.OpenAI) -> None:
    full = client.completions.create(model="tiny", prompt="A ship", max_tokens=12, **GREEDY)
    chunks = list(
        client.completions.create(
            model="tiny", prompt="A ship", max_tokens=12, stream=True,
            stream_options={"include_usage": True}, **GREEDY,
        )
    )  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) <= {None}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_uses_the_template_and_reports_usage(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=5,
        **GREEDY,
    )
    choice = result.choices[0]
    assert result.object == "chat.completion"
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == 5
    # The template wraps each message in header tokens, so the prompt is longer than its words.
    assert result.usage.prompt_tokens > 10


def test_streamed_chat_sends_role_then_content_then_finish_and_usage(
    client: openai.OpenAI,
) -> None:
    messages = [{"role": "user", "content": "Tell me about ships."}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=9, **GREEDY)
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=9, stream=True,
        stream_options={"include_usage": True}, **GREEDY,
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == full.choices[0].message.content
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 9
    assert all(c.id == chunks[0].id for c in chunks)


def test_n_samples_and_prompt_lists_give_one_choice_each(client: openai.OpenAI) -> None:
    result = client.completions.create(
        model="tiny", prompt=["one", "two"], n=2, max_tokens=3, temperature=1.0, seed=7
    )
    assert sorted(c.index for c in result.choices) == [0, 1, 2, 3]
    assert result.usage is not None and result.usage.completion_tokens <= 12


def test_logprobs_come_back_for_every_generated_token(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=4,
        logprobs=True, top_logprobs=3, **GREEDY,
    )  # fmt: skip
    content = result.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 4
    for entry in content:
        assert entry.logprob <= 0.0
        assert len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs))


def test_stop_string_ends_the_completion(client: openai.OpenAI) -> None:
    full = client.completions.create(model="tiny", prompt="Ports", max_tokens=20, **GREEDY)
    text = full.choices[0].text
    stop = text[len(text) // 2 :][:2]
    assert stop.strip(), "the greedy text should have a non-blank middle"
    cut = client.completions.create(
        model="tiny", prompt="Ports", max_tokens=20, stop=[stop], **GREEDY
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]


def test_streamed_chat_with_n_choices_streams_each_to_its_finish(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Two answers"}], max_tokens=5, n=2,
        stream=True, temperature=1.0, seed=3,
    )  # fmt: skip
    text: dict[int, str] = {0: "", 1: ""}
    finish: dict[int, str | None] = {}
    for chunk in stream:
        for choice in chunk.choices:
            text[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    assert set(finish) == {0, 1}
    assert all(text.values())


WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                       "properties": {"city": {"type": "string", "maxLength": 8}}},
    },
}  # fmt: skip


def test_a_forced_tool_call_parses_into_typed_tool_calls(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "Weather in Oslo?"}]
    result = client.chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER_TOOL], max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0.0,
    )  # fmt: skip
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city"}
    # The client's stream helper puts the chunks together into the same call.
    with client.chat.completions.stream(
        model="tiny", messages=messages, tools=[WEATHER_TOOL], max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0.0,
    ) as stream:  # fmt: skip
        final = stream.get_final_completion()
    (streamed,) = final.choices[0].message.tool_calls or []
    assert isinstance(streamed, ChatCompletionMessageFunctionToolCall)
    assert (streamed.function.name, streamed.function.arguments) == (
        call.function.name,
        call.function.arguments,
    )
    # The answer goes back as it came, followed by the tool's result.
    messages += [choice.message, {"role": "tool", "tool_call_id": call.id, "content": "12 C"}]
    answer = client.chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER_TOOL], max_tokens=2, temperature=0.0
    )
    assert answer.choices[0].message.role == "assistant"
