"""Streamed chunks as JSON text, with the parts that never change rendered once per response.

A streamed response sends one chunk per choice per engine step; building a pydantic model and
dumping it for each cost more than everything else the server does per token. The envelope
(``id``, ``object``, ``created``, ``model``, and ``usage`` when the client asked for it) is the
same in every chunk of a response, so it is rendered once; a chunk is that envelope around one
choice, whose few fields are formatted directly. The output is byte-for-byte what the pydantic
models in :mod:`.protocol` produce (tests hold the two to it).
"""

import json

from berth.runtime.server.tool_calls import CallDelta

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def json_value(value: object) -> str:
    """Compact JSON, non-ASCII text kept as is (as pydantic writes it)."""
    return _encode(value)


class ChunkFrame:
    """The constant envelope of one response's chunks."""

    def __init__(self, id: str, object: str, created: int, model: str, include_usage: bool):
        envelope = json_value({"id": id, "object": object, "created": created, "model": model})
        self._head = envelope[:-1] + ',"choices":['
        # With include_usage every chunk carries "usage": null, the last one the numbers.
        self._tail = '],"usage":null}' if include_usage else "]}"

    def chunk(self, choice: str, usage: str | None = None) -> str:
        """The chunk carrying one choice, given as JSON text, and ``usage`` (JSON text) when
        every chunk reports it (vLLM's ``continuous_usage_stats``)."""
        if usage is not None:
            return self._head + choice + '],"usage":' + usage + "}"
        return self._head + choice + self._tail


def completion_choice(index: int, text: str, logprobs: str, finish_reason: str | None) -> str:
    """A ``text_completion`` chunk's choice; ``logprobs`` is JSON text (``null`` for none)."""
    return (
        f'{{"index":{index},"text":{_encode(text)},"logprobs":{logprobs},'
        f'"finish_reason":{_encode(finish_reason)}}}'
    )


def tool_call_deltas(calls: list[CallDelta]) -> list[dict[str, object]]:
    """OpenAI's ``delta.tool_calls``: a call's first fragment with its id, type and name."""
    out: list[dict[str, object]] = []
    for call in calls:
        if call.id is None:
            out.append({"index": call.index, "function": {"arguments": call.arguments}})
        else:
            function = {"name": call.name, "arguments": call.arguments}
            out.append({"index": call.index, "id": call.id, "type": "function",
                        "function": function})  # fmt: skip
    return out


def chat_choice(
    index: int,
    content: str,
    logprobs: str,
    finish_reason: str | None,
    tool_calls: list[CallDelta] | None = None,
    reasoning: str = "",
) -> str:
    """A ``chat.completion.chunk``'s choice; empty ``content`` and ``reasoning`` and no
    ``tool_calls`` leave the delta empty."""
    fields = []
    if reasoning:
        fields.append(f'"reasoning_content":{_encode(reasoning)}')
    if content:
        fields.append(f'"content":{_encode(content)}')
    if tool_calls:
        fields.append(f'"tool_calls":{_encode(tool_call_deltas(tool_calls))}')
    delta = "{" + ",".join(fields) + "}"
    return (
        f'{{"index":{index},"delta":{delta},"logprobs":{logprobs},'
        f'"finish_reason":{_encode(finish_reason)}}}'
    )
