"""JSON schemas, regular expressions, choices and Lark texts as llguidance grammars, for the
server (which checks them before the engine sees a request) and the engine (``structured``); no
torch here, so the server process can import it.

llguidance is Rust: a fault inside it surfaces as pyo3's ``PanicException``, which derives from
``BaseException``, not ``Exception`` (fuzzing schemas found one: an error message cut inside a
multi-byte character). Both callers turn it into the ``ValueError`` that bad input gets, so a
schema can never take a request handler or the engine loop down.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# Whitespace between JSON tokens: any of JSON's four, at most this many in a row. Pretty
# printing fits; a model cannot stall in whitespace forever, a known failure of unbounded
# JSON grammars.
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,16}"
MAX_MESSAGE = 300  # characters of llguidance's message kept (it may quote the whole schema)


@contextmanager
def refused_as_value_error() -> Iterator[None]:
    """Run llguidance; its panics become ``ValueError`` with the first line of the message."""
    try:
        yield
    except BaseException as error:
        if type(error).__name__ != "PanicException":
            raise
        first = str(error).splitlines()[0] if str(error) else "no message"
        raise ValueError(f"the grammar could not be compiled: {first[:MAX_MESSAGE]}") from None


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """The grammar of the JSON values ``schema`` accepts; ``ValueError`` saying what is wrong.
    Cached by the schema's text: an application tends to send one schema with every request,
    and the server asks once per choice. The keys keep their order: llguidance writes an
    object's properties in the order the schema lists them (as OpenAI's structured output
    does), so sorting them would reorder the output."""
    return _grammar(json.dumps(schema))


@functools.lru_cache(maxsize=256)
def _grammar(schema: str) -> str:
    from llguidance import LLMatcher

    return _validated(
        lambda: LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_pattern": JSON_WHITESPACE}
        )
    )


def lark_grammar(text: str) -> str:
    """The grammar of an llguidance Lark text (``%json`` schemas inline); ``ValueError`` saying
    what is wrong. Cached by the text, like :func:`json_schema_grammar`."""
    return _lark(text)


@functools.lru_cache(maxsize=256)
def _lark(text: str) -> str:
    from llguidance import LLMatcher

    return _validated(lambda: LLMatcher.grammar_from_lark(text))


def regex_grammar(pattern: str) -> str:
    """The grammar of the texts a whole match of ``pattern`` (Rust regex syntax, as vLLM's
    guidance backend takes it) can be; ``ValueError`` saying what is wrong."""
    return _regex(pattern)


@functools.lru_cache(maxsize=256)
def _regex(pattern: str) -> str:
    from llguidance import LLMatcher

    return _validated(lambda: LLMatcher.grammar_from_regex(pattern))


def choice_grammar(choices: tuple[str, ...]) -> str:
    """The grammar of exactly one of ``choices`` (vLLM's guided_choice)."""
    return _lark(choice_lark(choices))


# Lark texts of the constraints, whose rule ``start`` is the whole output: what a thought
# (``after_thought``) can be put in front of.


def json_value(schema: dict[str, Any]) -> str:
    """``schema`` as a Lark ``%json`` value, with the whitespace bound every JSON grammar of
    the server has (``JSON_WHITESPACE``)."""
    options = {"x-guidance": {"whitespace_pattern": JSON_WHITESPACE}}
    return "%json " + json.dumps({**schema, **options}, ensure_ascii=False)


def json_lark(schema: dict[str, Any]) -> str:
    return f"start: {json_value(schema)}\n"


def regex_lark(pattern: str) -> str:
    """``pattern`` as a Lark regex literal: an unescaped ``/`` would end it."""
    out, escaped = [], False
    for char in pattern:
        out.append("\\/" if char == "/" and not escaped else char)
        escaped = char == "\\" and not escaped
    return "start: /" + "".join(out) + "/\n"


def choice_lark(choices: tuple[str, ...]) -> str:
    return "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices) + "\n"


def after_thought(answer: str, opens_inside: bool) -> str:
    """The grammar of a thinking model's output: a thought between ``<think>`` and the first
    ``</think>`` (free text), then the answer Lark text ``answer`` describes (its ``start``
    rule, which nothing else in it may name). ``opens_inside``: the chat template opened the
    thought, so the output starts inside it (DeepSeek-R1); else the thought is optional and
    opens only at the start (Qwen3, which writes none with ``enable_thinking`` off). Compiled,
    cached; ``ValueError`` saying what is wrong."""
    return _after_thought(answer, opens_inside)


@functools.lru_cache(maxsize=256)
def _after_thought(answer: str, opens_inside: bool) -> str:
    renamed = re.sub(r"(?m)^start\s*:", "berth_answer:", answer)
    head = (
        'start: "<think>"? berth_thought berth_gap berth_answer'
        if opens_inside
        else 'start: berth_open? berth_answer\nberth_open: "<think>" berth_thought berth_gap'
    )
    rules = [
        renamed.rstrip("\n"),
        'berth_thought[lazy]: /(?s:.*)/ "</think>"',
        "berth_gap: /[ \\t\\r\\n]{0,8}/",
        head,
    ]
    return _lark("\n".join(rules) + "\n")


def _validated(build: Callable[[], str]) -> str:
    """The grammar ``build`` makes, checked by llguidance; its refusal as ``ValueError``."""
    from llguidance import LLMatcher

    with refused_as_value_error():
        grammar = build()
        problem = LLMatcher.validate_grammar(grammar)
    if problem:
        raise ValueError(problem[:MAX_MESSAGE])
    return grammar
