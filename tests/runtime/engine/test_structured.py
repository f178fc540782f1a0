"""Structured output: a request with a grammar produces text its JSON schema accepts, whatever
the (random) model prefers, without changing the requests beside it."""

from __future__ import annotations

import json

import jsonschema_rs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from berth.runtime.engine import Engine, SamplingParams
from berth.runtime.engine.grammar import json_schema_grammar
from berth.runtime.engine.sampler import allowed_only

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tag": {"enum": ["quay", "berth"]},
        "items": {"type": "array", "items": {"type": "integer", "maximum": 9}, "maxItems": 3},
    },
    "required": ["ok", "n", "tag", "items"],
    "additionalProperties": False,
}


def grammar(schema: dict[str, object]) -> str:
    return json_schema_grammar(schema)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_output_is_valid_under_its_schema_and_ends_when_complete(
    tiny_engine: Engine, temperature: float
) -> None:
    validator = jsonschema_rs.validator_for(SCHEMA)
    params = SamplingParams(
        max_tokens=200, temperature=temperature, seed=5, grammar=grammar(SCHEMA)
    )
    prompts = ["A container ship", "Numbers: 1 2 3", "x", "The harbour master"]
    for out in tiny_engine.generate(prompts, params):
        assert out.finish_reason == "stop", out.new_text
        assert validator.is_valid(json.loads(out.new_text)), out.new_text
        assert len(out.new_token_ids) == out.num_output_tokens


def test_properties_come_out_in_the_order_the_schema_lists_them(tiny_engine: Engine) -> None:
    schema = {"type": "object", "additionalProperties": False, "required": ["zeta", "alpha"],
              "properties": {"zeta": {"type": "boolean"}, "alpha": {"type": "boolean"}}}  # fmt: skip
    params = SamplingParams(max_tokens=60, temperature=0.0, grammar=grammar(schema))
    (out,) = tiny_engine.generate(["A container ship"], params)
    assert list(json.loads(out.new_text)) == ["zeta", "alpha"], out.new_text


def test_a_grammar_ends_the_output_even_when_eos_is_ignored(tiny_engine: Engine) -> None:
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True,
                            grammar=grammar({"enum": ["quay", "berth"]}))  # fmt: skip
    (out,) = tiny_engine.generate(["A container ship"], params)
    assert out.finish_reason == "stop" and json.loads(out.new_text) in ("quay", "berth")


def test_a_structured_request_leaves_the_requests_beside_it_unchanged(tiny_engine: Engine) -> None:
    """The mask applies to its own row; the plain request takes the synchronous path while the
    structured one is live, and still produces what it produces alone."""
    plain = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone = tiny_engine.generate(["Keys and values are cached"], plain)[0].new_token_ids
    small = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
             "additionalProperties": False}  # fmt: skip
    json_params = SamplingParams(max_tokens=200, temperature=0.0, grammar=grammar(small))
    tiny_engine.add_request("json", "A container ship", json_params)
    tiny_engine.add_request("plain", "Keys and values are cached", plain)
    outs: dict[str, list[int]] = {}
    texts: dict[str, str] = {}
    while tiny_engine.has_unfinished():
        for out in tiny_engine.step():
            outs.setdefault(out.request_id, []).extend(out.new_token_ids)
            texts[out.request_id] = texts.get(out.request_id, "") + out.new_text
    assert outs["plain"] == alone
    assert json.loads(texts["json"]) in ({"ok": True}, {"ok": False})


def test_a_grammar_the_tokenizer_cannot_serve_and_min_tokens_are_refused(
    tiny_engine: Engine,
) -> None:
    with pytest.raises(ValueError, match="response_format"):
        tiny_engine.add_request("bad", "x", SamplingParams(grammar="start: undefined_rule"))
    with pytest.raises(ValueError, match="min_tokens"):
        tiny_engine.add_request("both", "x", SamplingParams(
            max_tokens=8, min_tokens=2, grammar=grammar({"type": "object"})))  # fmt: skip
    assert not tiny_engine.has_unfinished()


@settings(max_examples=200, deadline=None)
@given(
    words=st.lists(st.integers(-(2**31), 2**31 - 1), min_size=6, max_size=6),
    vocab=st.integers(130, 192),
    row=st.integers(0, 2),
)
def test_a_bitmask_keeps_exactly_the_ids_whose_bit_is_set_in_its_row_alone(
    words: list[int], vocab: int, row: int
) -> None:
    logits = torch.randn(3, vocab)
    kept = allowed_only(logits, [row], torch.tensor([words], dtype=torch.int32))
    for i in range(vocab):
        bit = (words[i // 32] >> (i % 32)) & 1
        assert bool(torch.isfinite(kept[row, i])) == bool(bit)
        if bit:
            assert kept[row, i] == logits[row, i]
    others = [r for r in range(3) if r != row]
    assert torch.equal(kept[others], logits[others])


def test_a_schema_that_makes_llguidance_panic_is_a_value_error_not_a_crash() -> None:
    """Found by fuzzing schemas: llguidance 1.9 cuts its message about a malformed "required"
    at byte 100, inside a multi-byte character, and panics (pyo3's PanicException, a
    BaseException). The server and the engine get the ValueError that bad input gets."""
    schema = {"required": {"k": "a" * 83 + "\U0007b574" * 3}}
    with pytest.raises(ValueError, match="could not be compiled"):
        json_schema_grammar(schema)
