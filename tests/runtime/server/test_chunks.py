"""Streamed chunks written as text are exactly what the pydantic response models produce."""

from hypothesis import given
from hypothesis import strategies as st

from berth.runtime.server.chunks import ChunkFrame, chat_choice, completion_choice
from berth.runtime.server.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    FunctionCallDelta,
    ToolCallDelta,
)
from berth.runtime.server.tool_calls import CallDelta

FINISH = st.sampled_from([None, "stop", "length", "abort"])
NAMES = st.text(min_size=1, max_size=20)


@given(
    text=st.text(),
    index=st.integers(0, 1000),
    finish=FINISH,
    include_usage=st.booleans(),
    model=NAMES,
    with_logprobs=st.booleans(),
)
def test_completion_chunk_matches_the_pydantic_model(
    text: str, index: int, finish: str | None, include_usage: bool, model: str, with_logprobs: bool
) -> None:
    logprobs = None
    if with_logprobs:
        logprobs = CompletionLogprobs(
            tokens=[text], token_logprobs=[-0.5], top_logprobs=[{text: -0.5}], text_offset=[3]
        )
    choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish)
    expected = CompletionResponse(id="cmpl-1", created=17, model=model, choices=[choice])
    frame = ChunkFrame("cmpl-1", "text_completion", 17, model, include_usage)
    logprobs_json = logprobs.model_dump_json() if logprobs else "null"
    written = frame.chunk(completion_choice(index, text, logprobs_json, finish))
    assert written == expected.model_dump_json(exclude=None if include_usage else {"usage"})


@given(
    text=st.text(),
    index=st.integers(0, 1000),
    finish=FINISH,
    include_usage=st.booleans(),
    model=NAMES,
    with_logprobs=st.booleans(),
)
def test_chat_chunk_matches_the_pydantic_model(
    text: str, index: int, finish: str | None, include_usage: bool, model: str, with_logprobs: bool
) -> None:
    logprobs = None
    if with_logprobs:
        entry = ChatTokenLogprob(token=text, logprob=-1.25, bytes=list(text.encode()))
        logprobs = ChatLogprobs(content=[entry])
    delta = ChatDelta(content=text) if text else ChatDelta()
    choice = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)
    expected = ChatCompletionChunk(id="chatcmpl-1", created=17, model=model, choices=[choice])
    frame = ChunkFrame("chatcmpl-1", "chat.completion.chunk", 17, model, include_usage)
    logprobs_json = logprobs.model_dump_json() if logprobs else "null"
    written = frame.chunk(chat_choice(index, text, logprobs_json, finish))
    assert written == expected.model_dump_json(exclude=None if include_usage else {"usage"})


CALL_DELTAS = st.lists(
    st.builds(
        CallDelta,
        index=st.integers(0, 8),
        id=st.none() | st.just("call_0123456789abcdef01234567"),
        name=st.text(min_size=1, max_size=10),
        arguments=st.text(max_size=30),
    ),
    max_size=3,
)


@given(text=st.text(max_size=20), index=st.integers(0, 1000), finish=FINISH, calls=CALL_DELTAS)
def test_chat_chunk_with_tool_call_deltas_matches_the_pydantic_model(
    text: str, index: int, finish: str | None, calls: list[CallDelta]
) -> None:
    """A call's first fragment carries its id, type and name; later ones only arguments."""
    deltas = [
        ToolCallDelta(index=c.index, function=FunctionCallDelta(arguments=c.arguments))
        if c.id is None
        else ToolCallDelta(index=c.index, id=c.id, type="function",
                           function=FunctionCallDelta(name=c.name, arguments=c.arguments))
        for c in calls
    ]  # fmt: skip
    delta = ChatDelta(content=text or None, tool_calls=deltas or None)
    choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish)
    expected = ChatCompletionChunk(id="chatcmpl-1", created=17, model="m", choices=[choice])
    frame = ChunkFrame("chatcmpl-1", "chat.completion.chunk", 17, "m", False)
    written = frame.chunk(chat_choice(index, text, "null", finish, calls))
    assert written == expected.model_dump_json(exclude={"usage"})
