"""The grammar of ``auto`` calls (strict tools, or tools beside a ``response_format``) against the
readers that take calls out of a model's text: whatever a model writes under it once a call has
begun, the reader takes out calls of the tools whose arguments follow their schemas. The
"model" is a random walk over the tiny model's real tokenizer, each token drawn among those the
grammar's mask allows, as the engine's sampler draws them."""

import json
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tool_schemas import DIGIT, SCHEMAS, VALID

from berth.runtime.engine.grammar import lark_grammar
from berth.runtime.engine.tokenizer import Tokenizer
from berth.runtime.server.protocol import ChatTool
from berth.runtime.server.tool_calls import CallFormat, HermesReader, LlamaReader
from berth.runtime.server.tools import ToolPlan

MAX_STEPS = 400


def tools(strict: bool = True) -> list[ChatTool]:
    return [
        ChatTool.model_validate({"type": "function", "function": {"name": name,
                                                                  "parameters": schema,
                                                                  "strict": strict}})
        for name, schema in SCHEMAS.items()
    ]  # fmt: skip


@pytest.fixture(scope="module")
def vocabulary(tiny_model: Path) -> tuple[Tokenizer, Any]:
    from llguidance import LLTokenizer

    tokenizer = Tokenizer(tiny_model)
    index = LLTokenizer(tokenizer.hf.to_str(), eos_token=tokenizer.eos_token_ids)
    return tokenizer, index


def walk(vocabulary: tuple[Tokenizer, Any], grammar: str, prefix: str, seed: int) -> str:
    """``prefix``, then tokens drawn at random among those the grammar allows, until an end
    of sequence is drawn or ``MAX_STEPS``; the text written."""
    from llguidance import LLMatcher
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    tokenizer, index = vocabulary
    matcher = LLMatcher(index, lark_grammar(grammar), log_level=0)
    ids = tokenizer.hf.encode(prefix, add_special_tokens=False).ids
    assert matcher.consume_tokens(ids), matcher.get_error()
    rng = random.Random(seed)
    mask = allocate_token_bitmask(1, index.vocab_size)
    for _ in range(MAX_STEPS):
        fill_next_token_bitmask(matcher, mask, 0)
        words = mask[0].view("uint32")
        allowed = [i for i in range(index.vocab_size) if words[i // 32] >> (i % 32) & 1]
        token = rng.choice(allowed)
        if token in tokenizer.eos_token_ids:
            break
        assert matcher.consume_token(token), matcher.get_error()
        ids.append(token)
    return tokenizer.hf.decode(ids)


def read_calls(text: str, style: CallFormat, parallel: bool) -> tuple[str, list[Any]]:
    reader = (HermesReader if style == "hermes" else LlamaReader)(
        frozenset(SCHEMAS), None if parallel else 1
    )
    piece = reader.feed(text) + reader.finish()
    return piece.content, [(c.name, json.loads(c.arguments)) for c in piece.calls]


@settings(max_examples=24, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    seed=st.integers(0, 2**32 - 1),
    style=st.sampled_from(["hermes", "llama"]),
    parallel=st.booleans(),
    answer=st.booleans(),
)
def test_whatever_is_written_once_a_call_begins_reads_as_valid_calls(
    vocabulary: tuple[Tokenizer, Any], seed: int, style: CallFormat, parallel: bool, answer: bool
) -> None:
    plan = ToolPlan(tools(), "auto", parallel=parallel)
    grammar = plan.auto_grammar(style, DIGIT if answer else None)
    assert grammar is not None
    if style == "hermes":
        prefix = "<tool_call>" if answer else "Let me look.\n<tool_call>"
    else:
        prefix = '{"name": "'
    _, calls = read_calls(walk(vocabulary, grammar, prefix, seed), style, parallel)
    assert calls, "the begun call was not read as one"
    assert parallel or len(calls) == 1
    for name, arguments in calls:
        assert VALID[name].is_valid(arguments), (name, arguments)


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**32 - 1), style=st.sampled_from(["hermes", "llama"]))
def test_an_answer_beside_tools_is_the_formats_json(
    vocabulary: tuple[Tokenizer, Any], seed: int, style: CallFormat
) -> None:
    grammar = ToolPlan(tools(strict=False), "auto").auto_grammar(style, DIGIT)
    assert grammar is not None
    content, calls = read_calls(walk(vocabulary, grammar, '{"n"', seed), style, True)
    assert not calls and VALID["pick"].is_valid(json.loads(content))


def test_free_tools_forced_choices_and_none_need_no_auto_grammar() -> None:
    assert ToolPlan(tools(strict=False), "auto").auto_grammar("hermes", None) is None
    for mode in ("none", "required"):
        assert ToolPlan(tools(), mode).auto_grammar("hermes", DIGIT) is None  # type: ignore[arg-type]
    named = ToolPlan(tools(), "named", "pick")
    assert named.auto_grammar("llama", None) is None


@pytest.mark.parametrize("style", ["hermes", "llama"])
def test_prose_opens_freely_but_a_llama_message_opening_with_json_is_a_call(
    vocabulary: tuple[Tokenizer, Any], style: CallFormat
) -> None:
    from llguidance import LLMatcher

    tokenizer, index = vocabulary
    grammar = lark_grammar(ToolPlan(tools(), "auto").auto_grammar(style, None) or "")

    def accepts(text: str) -> bool:
        matcher = LLMatcher(index, grammar, log_level=0)
        ids = tokenizer.hf.encode(text, add_special_tokens=False).ids
        return matcher.consume_tokens(ids) and matcher.is_accepting()

    assert accepts("") and accepts("It is sunny.") and accepts("\n It is sunny. {x}")
    assert accepts('{"x": 1}') == (style == "hermes")  # Llama: "{" opens a call
