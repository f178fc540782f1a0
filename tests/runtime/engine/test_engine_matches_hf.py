"""Greedy outputs are token-identical to Hugging Face transformers on the same random model,
through every path that changes how the KV cache is filled: batching, prefix-cache hits,
chunked prefill and preemption."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from berth.runtime.engine import Engine, EngineConfig, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
HfGreedy = Callable[..., list[list[int]]]


def _prompts(vocab: int, lengths: list[int], seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def _engine(model: Path, **overrides: object) -> Engine:
    return Engine(EngineConfig(model=str(model), device="cpu", dtype="float32", **overrides))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen2", "tiny-qwen3", "tiny-llama-3.2"])
def test_batch_of_varied_prompts_matches_transformers(
    name: str, model_factory: Callable[[str], Path], hf_greedy: HfGreedy
) -> None:
    model = model_factory(name)
    engine = _engine(model)
    prompts = _prompts(engine.model_config.vocab_size, [1, 5, 16, 17, 33, 70])
    got = [o.new_token_ids for o in engine.generate(list(prompts), GREEDY)]
    assert got == hf_greedy(model, prompts, GREEDY.max_tokens)


def test_prefix_cache_hit_matches_transformers(tiny_model: Path, hf_greedy: HfGreedy) -> None:
    engine = _engine(tiny_model)
    shared = _prompts(engine.model_config.vocab_size, [50], seed=2)[0]
    first, second = [*shared, 7, 8, 9], [*shared, 11]
    out_first = engine.generate([first], GREEDY)[0]
    out_second = engine.generate([second], GREEDY)[0]
    assert out_first.num_cached_tokens == 0
    assert out_second.num_cached_tokens == 48  # three full blocks of the shared 50 tokens
    assert engine.stats().prefix_cache_hits == 48
    want = hf_greedy(tiny_model, [first, second], GREEDY.max_tokens)
    assert [out_first.new_token_ids, out_second.new_token_ids] == want


def test_whole_prompt_cached_still_matches(tiny_model: Path, hf_greedy: HfGreedy) -> None:
    """A prompt of exactly full blocks, seen before: its last block is recomputed to sample."""
    engine = _engine(tiny_model)
    prompt = _prompts(engine.model_config.vocab_size, [64], seed=3)[0]
    engine.generate([prompt], GREEDY)
    again = engine.generate([prompt], GREEDY)[0]
    assert again.num_cached_tokens == 48
    assert again.new_token_ids == hf_greedy(tiny_model, [prompt], GREEDY.max_tokens)[0]


def test_chunked_prefill_matches_transformers(tiny_model: Path, hf_greedy: HfGreedy) -> None:
    engine = _engine(tiny_model, max_num_batched_tokens=16)
    prompts = _prompts(engine.model_config.vocab_size, [100, 37, 3], seed=4)
    steps = 0
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY)
    got: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
        steps += 1
    assert steps > 100 // 16  # the long prompt really was split
    want = hf_greedy(tiny_model, prompts, GREEDY.max_tokens)
    assert [got[str(i)] for i in range(len(prompts))] == want


def test_preemption_recomputes_and_matches_transformers(
    tiny_model: Path, hf_greedy: HfGreedy
) -> None:
    # 12 blocks of 16 tokens for four sequences that each grow to 3-4 blocks: they must preempt.
    engine = _engine(tiny_model, num_kv_blocks=12, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = _prompts(engine.model_config.vocab_size, [30, 25, 35, 28], seed=5)
    got = [o.new_token_ids for o in engine.generate(list(prompts), params)]
    assert engine.stats().num_preemptions > 0
    assert got == hf_greedy(tiny_model, prompts, params.max_tokens)
    assert engine.stats().num_free_blocks == 12


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen3"])
def test_fused_rope_and_cache_write_matches_transformers(
    name: str,
    model_factory: Callable[[str], Path],
    hf_greedy: HfGreedy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The GPU's layer path, RoPE (after Qwen3's q/k norm) and the cache write in one Triton
    kernel rotating q and k in place inside the QKV output, run here by Triton's interpreter
    (tests/conftest.py) beside the reference attention: prompts, chunks and decodes still match
    transformers. On a GPU every engine test runs this path."""
    if torch.cuda.is_available():
        pytest.skip("the kernel runs compiled here, on CUDA tensors only")
    from berth.kernels import reference, rope_write_kv_cache
    from berth.runtime.engine import model_runner
    from berth.runtime.engine.model import AttentionOps

    ops = AttentionOps(
        reference.write_kv_cache,
        reference.paged_decode_attention,
        reference.paged_prefill_attention,
        rope_write_kv_cache,
    )
    model = model_factory(name)
    prompts = _prompts(256, [1, 5, 17, 33, 70])
    params = dataclasses.replace(GREEDY, logprobs=0)
    plain = _engine(model, max_num_batched_tokens=32).generate(list(prompts), params)
    monkeypatch.setattr(model_runner, "attention_ops", lambda device: (ops, "reference"))
    fused = _engine(model, max_num_batched_tokens=32).generate(list(prompts), params)  # chunks
    assert [o.new_token_ids for o in fused] == hf_greedy(model, prompts, GREEDY.max_tokens)
    # The random models' greedy tokens lean on the residual stream: the log-probabilities
    # show what attention did (float32 rounding apart, the same as the unfused path).
    for a, b in zip(fused, plain, strict=True):
        assert a.logprobs is not None and b.logprobs is not None
        got, want = [t.logprob for t in a.logprobs], [t.logprob for t in b.logprobs]
        assert got == pytest.approx(want, abs=1e-4)


def test_penalties_and_logit_bias_match_transformers_with_openais_rule(
    tiny_model: Path, hf_greedy: HfGreedy
) -> None:
    """Greedy requests with presence, frequency and repetition penalties and a logit bias,
    batched with a plain one, through chunked prefill: each equals transformers' greedy
    continuation with, in vLLM's order, the bias added, transformers' repetition penalty (its
    own logits processor, over prompt and output), then OpenAI's rule (logit - frequency x
    count - presence x (count > 0) over the output so far)."""
    engine = _engine(tiny_model, max_num_batched_tokens=32)
    vocab = engine.model_config.vocab_size
    prompts = _prompts(vocab, [20, 45, 9], seed=5)
    favoured = {5: 4.0, 6: 4.0, 7: 4.0}  # three ids the output keeps coming back to
    adjusted = [
        dataclasses.replace(GREEDY, max_tokens=16, frequency_penalty=1.5, logit_bias=favoured),
        dataclasses.replace(GREEDY, max_tokens=16, presence_penalty=2.0, logit_bias={9: -100.0},
                            repetition_penalty=1.5),
    ]  # fmt: skip
    tokens: dict[str, list[int]] = {}
    for i, (prompt, params) in enumerate(zip(prompts, [*adjusted, GREEDY], strict=True)):
        engine.add_request(str(i), prompt, params)
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    got = [tokens[str(i)] for i in range(3)]

    def rule(
        params: SamplingParams, prompt: list[int]
    ) -> Callable[[torch.Tensor, list[int]], torch.Tensor]:
        from transformers import RepetitionPenaltyLogitsProcessor

        repetition = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)

        def apply(logits: torch.Tensor, output: list[int]) -> torch.Tensor:
            x = logits.clone().float()
            for token, bias in params.logit_bias.items():
                x[token] += bias
            x = repetition(torch.tensor([[*prompt, *output]]), x[None])[0]
            for token in set(output):
                count = output.count(token)
                x[token] -= count * params.frequency_penalty + params.presence_penalty
            return x

        return apply

    for i, params in enumerate(adjusted):
        (want,) = hf_greedy(tiny_model, [prompts[i]], 16, rule(params, prompts[i]))
        assert got[i] == want, i
    assert got[2] == hf_greedy(tiny_model, [prompts[2]], GREEDY.max_tokens)[0]
    assert 9 not in got[1]
    without = dataclasses.replace(adjusted[1], repetition_penalty=1.0)
    assert got[1] != engine.generate([prompts[1]], without)[0].new_token_ids  # it told
    assert sum(t in favoured for t in got[0]) >= 3  # the bias shows, the penalty spreads it
