"""Tool calls out of a model's text, a piece at a time: what streams as content, what as calls.

A choice's text goes through one *reader*, fed each new piece of text (``feed``) and told when
the output has ended (``finish``). Each answers a :class:`Piece`: the content that is now
certain and the call fragments that are now known. A streamed response sends the pieces as they
come; a collected one feeds the whole text at once and joins them, so both say the same.

Readers by ``tool_choice``:

- ``auto``: the model writes freely, and calls in its template family's format are taken out of
  the text: :class:`HermesReader` for ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  (Hermes, Qwen2/2.5/3, and the system prompt Berth writes for a template that ignores tools),
  :class:`LlamaReader` for Llama 3.1/3.2's bare ``{"name": ..., "parameters": {...}}`` that
  opens the message. Text that may still become a call (a marker begun, a JSON object not yet
  closed) is held back; a call whose name is not a tool's, or whose arguments are not a JSON
  object, stays in the content as written. Whitespace between text and a call is dropped.
- ``required`` and a named function: the grammar made the output a call, so
  :class:`ForcedReader` reads the known JSON shape as it grows and streams the arguments'
  text while it is generated.

Pure: no I/O, never raises on any text.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

CallFormat = Literal["hermes", "llama"]
WHITESPACE = " \t\n\r"


def new_call_id() -> str:
    """A call's id, as OpenAI writes them (``call_`` and 24 random characters)."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class CallDelta:
    """A fragment of call number ``index`` of the message: the first fragment of a call has
    its id and name, every fragment some of its arguments' JSON text (possibly none)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class Piece:
    """What one step of a reader makes certain: content text and call fragments."""

    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)

    def __add__(self, other: Piece) -> Piece:
        return Piece(self.content + other.content, merged(self.calls + other.calls))

    def __bool__(self) -> bool:
        return bool(self.content or self.calls)


def merged(deltas: list[CallDelta]) -> list[CallDelta]:
    """Neighbouring fragments of one call joined into one (a chunk carries each call once)."""
    out: list[CallDelta] = []
    for delta in deltas:
        if out and out[-1].index == delta.index and delta.id is None:
            out[-1] = CallDelta(out[-1].index, out[-1].id, out[-1].name,
                                out[-1].arguments + delta.arguments)  # fmt: skip
        else:
            out.append(CallDelta(delta.index, delta.id, delta.name, delta.arguments))
    return out


class CallReader(Protocol):
    """Reads one choice's text for tool calls (see the module's docstring)."""

    calls: int  # calls begun so far
    complete: bool  # every call begun has all of its arguments

    def feed(self, text: str) -> Piece: ...

    def finish(self) -> Piece: ...


def format_calls(calls: list[tuple[str, Any]], style: CallFormat) -> str:
    """Calls written the way a template family asks the model to write them (``arguments``
    as their JSON value)."""
    if style == "hermes":
        return "\n".join(
            f"<tool_call>\n{_json({'name': name, 'arguments': arguments})}\n</tool_call>"
            for name, arguments in calls
        )
    return "; ".join(_json({"name": name, "parameters": arguments}) for name, arguments in calls)


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


def _arguments(
    call: object, names: frozenset[str], keys: tuple[str, ...]
) -> tuple[str, str] | None:
    """(name, arguments as JSON text) if ``call`` is a call of one of ``names`` whose arguments,
    under the first of ``keys`` present, are an object (or a string holding one: some models
    encode them twice); None otherwise."""
    if not isinstance(call, dict) or not isinstance(name := call.get("name"), str):
        return None
    arguments: object = next((call[key] for key in keys if key in call), {})
    if isinstance(arguments, str):
        arguments = _loads(arguments)
    if name not in names or not isinstance(arguments, dict):
        return None
    return name, _json(arguments)


def _not_json(constant: str) -> object:
    raise ValueError(f"{constant} is not JSON")


def _loads(text: str) -> object:
    """The JSON value of ``text``, or None when it is not one (Python's ``NaN`` and
    ``Infinity``, and nesting too deep to parse, included)."""
    try:
        return json.loads(text, parse_constant=_not_json)
    except (ValueError, RecursionError):
        return None


def _marker_prefix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker`` (a marker cut mid-way)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


def _trailing_space(text: str) -> int:
    return len(text) - len(text.rstrip(WHITESPACE))


class _TextReader:
    """A reader of calls written in the text: what is fed waits in ``_pending`` until
    ``_advance`` can say whether it is content or a call."""

    _pending: str

    def feed(self, text: str) -> Piece:
        self._pending += text
        return self._advance(final=False)

    def finish(self) -> Piece:
        return self._advance(final=True)

    def _advance(self, final: bool) -> Piece:
        raise NotImplementedError


class HermesReader(_TextReader):
    """Calls written ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` anywhere in
    the text; the last may lack its closing tag when the output ends right after the JSON."""

    START, END = "<tool_call>", "</tool_call>"

    def __init__(self, names: frozenset[str], max_calls: int | None = None) -> None:
        self.names, self.max_calls = names, max_calls
        self.calls, self.complete = 0, True
        self._pending = ""  # text not decided yet
        self._trim = False  # drop the whitespace that follows a call

    def _advance(self, final: bool) -> Piece:
        piece = Piece()
        while True:
            if self._trim:
                self._pending = self._pending.lstrip(WHITESPACE)
                if not self._pending:
                    return piece
                self._trim = False
            pending = self._pending
            start = pending.find(self.START)
            if start < 0:
                held = 0 if final else _marker_prefix(pending, self.START)
                held += 0 if final else _trailing_space(pending[: len(pending) - held])
                piece.content += pending[: len(pending) - held]
                self._pending = pending[len(pending) - held :]
                return piece
            body = start + len(self.START)
            end = pending.find(self.END, body)
            if end < 0 and not final:  # the call is still being written
                before = start - _trailing_space(pending[:start])
                piece.content += pending[:before]
                self._pending = pending[before:]
                return piece
            if end < 0:  # the output ended inside the call
                end = after = len(pending)
            else:
                after = end + len(self.END)
            keys = ("arguments", "parameters")
            call = _arguments(_loads(pending[body:end]), self.names, keys)
            if call is None or self.calls == self.max_calls:
                piece.content += pending[:after]  # not a call: the text stays as written
            else:
                piece.content += pending[:start].rstrip(WHITESPACE)
                piece.calls.append(CallDelta(self.calls, new_call_id(), call[0], call[1]))
                self.calls += 1
                self._trim = True
            self._pending = pending[after:]


class JsonEnd:
    """Finds where one JSON value ends in text given a piece at a time: bracket depth, aware of
    strings and escapes. The value must start at the first character fed."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = self.escaped = False
        self.scalar = False  # a number or a literal, ended by the first delimiter
        self.started = self.ended = False

    def feed(self, text: str) -> int:
        """How many characters of ``text`` belong to the value (all of them while it goes on;
        ``ended`` says when it is complete)."""
        for i, char in enumerate(text):
            if self.ended:
                return i
            if not self.started:
                if char in ",:}]":  # no value starts so: ended without having started
                    self.ended = True
                    return 0
                self.started = True
                if char in "{[":
                    self.depth = 1
                elif char == '"':
                    self.in_string = True
                else:
                    self.scalar = True
                continue
            if self.scalar:
                if char in ",}]" or char in WHITESPACE:
                    self.ended = True
                    return i
            elif self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
                    self.ended = self.depth == 0
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                self.ended = self.depth == 0
        return len(text)


class LlamaReader(_TextReader):
    """Llama 3.1/3.2's calls: the message opens with ``{"name": ..., "parameters": {...}}``
    (after an optional ``<|python_tag|>``; several separated by ``;``). Once the message opens
    with anything else, or a JSON object that is no call, the rest is plain content."""

    TAG = "<|python_tag|>"

    def __init__(self, names: frozenset[str], max_calls: int | None = None) -> None:
        self.names, self.max_calls = names, max_calls
        self.calls, self.complete = 0, True
        self._pending = ""
        self._prose = False
        self._scan: JsonEnd | None = None  # the object being read, from ``_start``
        self._start = self._scanned = 0

    def _advance(self, final: bool) -> Piece:
        piece = Piece()
        while not self._prose:
            pending = self._pending
            if self._scan is None:
                skip = WHITESPACE + (";" if self.calls else "")
                start = len(pending) - len(pending.lstrip(skip))
                rest = pending[start:]
                if rest.startswith(self.TAG):
                    start += len(self.TAG)
                    rest = rest[len(self.TAG) :]
                if not final and (not rest or self.TAG.startswith(rest)):
                    return piece  # nothing decided yet
                if not rest.startswith("{") or self.calls == self.max_calls:
                    self._to_prose(piece)
                    break
                self._scan, self._start, self._scanned = JsonEnd(), start, start
            self._scanned += self._scan.feed(pending[self._scanned :])
            if not self._scan.ended and not final:
                return piece
            end = self._scanned
            call = _arguments(_loads(pending[self._start : end]), self.names,
                              ("parameters", "arguments"))  # fmt: skip
            self._scan = None
            if call is None:
                self._to_prose(piece)
                break
            piece.calls.append(CallDelta(self.calls, new_call_id(), call[0], call[1]))
            self.calls += 1
            self._pending = pending[end:]
            if final and not self._pending.strip(WHITESPACE + ";"):
                self._pending = ""
                return piece
        piece.content += self._pending
        self._pending = ""
        return piece

    def _to_prose(self, piece: Piece) -> None:
        """The rest of the message is content (after a call, without the separator)."""
        self._prose = True
        if self.calls:
            self._pending = self._pending.lstrip(WHITESPACE + ";")


class ForcedReader:
    """The output of a forced call, whose grammar fixed its shape: the arguments alone (a
    named function), or ``{"name": ..., "arguments": ...}`` objects, in an array unless
    ``parallel`` is false (``required``). Whitespace may come between the JSON tokens."""

    CALL = ("{", '"name"', ":", "<name>", ",", '"arguments"', ":", "<arguments>", "}")

    def __init__(self, name: str | None = None, parallel: bool = True) -> None:
        self.calls, self.complete = 0, False
        self._name = name
        self._pending = ""
        self._value: JsonEnd | None = None  # the arguments being streamed
        # What comes next: literal JSON tokens, or <name>, <arguments>, <more> and <end>.
        if name is not None:
            self._steps = ["<arguments>", "<end>"]
        elif parallel:
            self._steps = ["[", *self.CALL, "<more>"]
        else:
            self._steps = [*self.CALL, "<end>"]

    def feed(self, text: str) -> Piece:
        self._pending += text
        return self._advance()

    def finish(self) -> Piece:
        piece = self._advance()
        if self._value is not None and self._value.scalar:  # a bare number ends with the text
            self._value, self._steps = None, self._steps[1:]
            piece += self._advance()
        return piece

    def _advance(self) -> Piece:
        piece = Piece()
        while self._steps:
            step = self._steps[0]
            if step == "<end>":
                self.complete, self._steps, self._pending = True, [], ""
                break
            if step == "<arguments>" and self._value is not None:
                size = self._value.feed(self._pending)
                if self._value.ended and not self._value.started:
                    return self._broken(piece)
                if size:
                    piece.calls.append(CallDelta(self.calls - 1, arguments=self._pending[:size]))
                self._pending = self._pending[size:]
                if not self._value.ended:
                    break
                self._value, self._steps = None, self._steps[1:]
                continue
            self._pending = self._pending.lstrip(WHITESPACE)
            if not self._pending:
                break
            if step == "<arguments>":
                self._value = JsonEnd()
                piece.calls.append(CallDelta(self.calls, new_call_id(), self._name, ""))
                self.calls += 1
            elif step == "<name>":
                scan = JsonEnd()
                size = scan.feed(self._pending)
                if not scan.ended:
                    break
                name = _loads(self._pending[:size])
                if not isinstance(name, str):
                    return self._broken(piece)
                self._name = name
                self._pending, self._steps = self._pending[size:], self._steps[1:]
            elif step == "<more>":  # after a call in the array: another one, or its end
                following = {",": [",", *self.CALL, "<more>"], "]": ["]", "<end>"]}
                if self._pending[0] not in following:
                    return self._broken(piece)
                self._steps = following[self._pending[0]]
            elif self._pending.startswith(step):
                self._pending, self._steps = self._pending[len(step) :], self._steps[1:]
            elif step.startswith(self._pending):
                break  # the token is still being written
            else:
                return self._broken(piece)
        return piece

    def _broken(self, piece: Piece) -> Piece:
        """Text the grammar would not have let through (a stop string cut the output):
        reading stops, and the calls begun so far stay incomplete."""
        self._steps, self._pending = [], ""
        return piece
