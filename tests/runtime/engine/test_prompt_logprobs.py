"""Prompt log-probabilities (``SamplingParams.prompt_logprobs``) equal transformers' log_softmax
of one full forward pass over the prompt, however the engine cuts and batches the prompt."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from berth.runtime.engine import Engine, EngineConfig, RequestOutput, SamplingParams, TokenLogprob
from berth.runtime.engine.prompt_logprobs import ROW_SLICE

TOP = 3


def _params(**overrides: object) -> SamplingParams:
    fields: dict[str, object] = {"max_tokens": 2, "temperature": 0.0, "ignore_eos": True}
    fields["prompt_logprobs"] = TOP
    return SamplingParams(**{**fields, **overrides})  # type: ignore[arg-type]


def _engine(model: Path, **overrides: object) -> Engine:
    return Engine(EngineConfig(model=str(model), device="cpu", dtype="float32", **overrides))  # type: ignore[arg-type]


def _prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def hf_log_softmax(tiny_model: Path):  # type: ignore[no-untyped-def]
    """[P, vocab] float32 log-probabilities of each next token, from one forward pass."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()

    def run(prompt: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt])).logits[0]
        return logits.float().log_softmax(dim=-1)

    return run


def _check(prompt: list[int], got: list[TokenLogprob | None] | None, want: torch.Tensor) -> None:
    assert got is not None
    assert len(got) == len(prompt)
    assert got[0] is None
    for p in range(1, len(prompt)):
        entry = got[p]
        assert entry is not None
        row = want[p - 1]
        assert entry.token_id == prompt[p]
        assert entry.logprob == pytest.approx(float(row[prompt[p]]), abs=1e-4)
        assert entry.rank == int((row > row[prompt[p]]).sum()) + 1
        ids = [t for t, _ in entry.top]
        assert len(ids) == TOP
        assert ids == row.topk(TOP).indices.tolist()
        for (_, value), expected in zip(entry.top, row.topk(TOP).values.tolist(), strict=True):
            assert value == pytest.approx(expected, abs=1e-4)


def test_two_chunked_prompts_batched_match_transformers(tiny_model: Path, hf_log_softmax) -> None:  # type: ignore[no-untyped-def]
    """Chunks of 16 tokens (a 150-token prompt over ten steps, beside a shorter one and a
    request that asks for none): every position scored once, in order, delivered with the
    first output only."""
    engine = _engine(tiny_model, max_num_batched_tokens=16)
    long, short, plain = _prompts(engine.model_config.vocab_size, [150, 23, 9], seed=5)
    engine.add_request("long", long, _params())
    engine.add_request("short", short, _params())
    engine.add_request("plain", plain, _params(prompt_logprobs=None))
    outputs: dict[str, list[RequestOutput]] = {"long": [], "short": [], "plain": []}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].append(out)
    for name, prompt in (("long", long), ("short", short)):
        first, *rest = outputs[name]
        _check(prompt, first.prompt_logprobs, hf_log_softmax(prompt))
        assert all(o.prompt_logprobs is None for o in rest)
    assert all(o.prompt_logprobs is None for o in outputs["plain"])


def test_long_prompt_scored_in_row_slices(tiny_model: Path, hf_log_softmax) -> None:  # type: ignore[no-untyped-def]
    """One step of more than two row slices."""
    engine = _engine(tiny_model, max_num_batched_tokens=512)
    prompt = _prompts(engine.model_config.vocab_size, [2 * ROW_SLICE + 40], seed=6)[0]
    out = engine.generate([prompt], _params())[0]
    _check(prompt, out.prompt_logprobs, hf_log_softmax(prompt))


def test_prefix_cache_does_not_hide_positions(tiny_model: Path, hf_log_softmax) -> None:  # type: ignore[no-untyped-def]
    """A second identical request, whose blocks the prefix cache holds, still gets every
    position: it computes them all again."""
    engine = _engine(tiny_model, enable_prefix_caching=True)
    prompt = _prompts(engine.model_config.vocab_size, [70], seed=7)[0]
    engine.generate([prompt], _params(prompt_logprobs=None))
    first = engine.generate([prompt], _params())[0]
    again = engine.generate([prompt], _params())[0]
    assert first.num_cached_tokens == again.num_cached_tokens == 0
    want = hf_log_softmax(prompt)
    _check(prompt, first.prompt_logprobs, want)
    _check(prompt, again.prompt_logprobs, want)
    assert engine.generate([prompt], _params(prompt_logprobs=None))[0].num_cached_tokens == 64


def test_zero_alternatives_and_one_token_prompt(tiny_model: Path, hf_log_softmax) -> None:  # type: ignore[no-untyped-def]
    engine = _engine(tiny_model)
    prompt = _prompts(engine.model_config.vocab_size, [12], seed=8)[0]
    one, twelve = engine.generate([prompt[:1], prompt], _params(prompt_logprobs=0))
    assert one.prompt_logprobs == [None]
    assert twelve.prompt_logprobs is not None
    want = hf_log_softmax(prompt)
    for p in range(1, len(prompt)):
        entry = twelve.prompt_logprobs[p]
        assert entry is not None and entry.top == []
        assert entry.logprob == pytest.approx(float(want[p - 1, prompt[p]]), abs=1e-4)


@pytest.mark.parametrize("value", [-1, 21, 1.5, True])
def test_bad_prompt_logprobs_refused(value: object) -> None:
    with pytest.raises(ValueError, match="prompt_logprobs must be None or an integer in"):
        SamplingParams(prompt_logprobs=value).validate(100)  # type: ignore[arg-type]


def test_preempted_prompts_score_each_position_once(tiny_model: Path, hf_log_softmax) -> None:  # type: ignore[no-untyped-def]
    """Too few blocks for three scored prompts in 16-token chunks: sequences are preempted
    and compute their prompts again; each position is still delivered once, as transformers
    gives it."""
    engine = _engine(tiny_model, num_kv_blocks=9, max_num_batched_tokens=16)
    prompts = _prompts(engine.model_config.vocab_size, [60, 50, 40], seed=9)
    outs = engine.generate(list(prompts), _params(max_tokens=20))
    assert engine.stats().num_preemptions > 0
    for prompt, out in zip(prompts, outs, strict=True):
        _check(prompt, out.prompt_logprobs, hf_log_softmax(prompt))
