"""The prefix cache seen from the engine: however a request ends (its length, a stop token, an
abort, a preemption) and however soon, the full blocks whose keys and values it computed are
named for the next identical prompt, and only those: greedy outputs stay those of transformers.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from berth.runtime.engine import Engine, EngineConfig, SamplingParams
from berth.runtime.engine.sequence import Sequence, SequenceStatus

BS = 16  # the engine's default block size
HfGreedy = Callable[[Path, list[list[int]], int], list[list[int]]]


def _engine(model: Path, **overrides: int) -> Engine:
    return Engine(EngineConfig(model=str(model), device="cpu", dtype="float32", **overrides))  # type: ignore[arg-type]


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1024) for _ in range(n)]  # the tiny model's vocabulary


def _greedy(max_tokens: int, **extra: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **extra)  # type: ignore[arg-type]


def _tokens(engine: Engine, steps: int | None = None) -> dict[str, list[int]]:
    """Each request's tokens out of ``steps`` steps (None: until all are done)."""
    got: dict[str, list[int]] = {}
    while engine.has_unfinished() and (steps is None or steps > 0):
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        steps = None if steps is None else steps - 1
    return got


def _cached_tokens(engine: Engine, tokens: list[int]) -> int:
    """How many leading tokens of ``tokens`` the prefix cache would serve right now."""
    probe = Sequence("probe", list(tokens), len(tokens), _greedy(1), len(tokens) + 1)
    return len(engine.pool.match_prefix(probe)) * BS


def _check_pool(engine: Engine) -> None:
    engine.pool.check_invariants(engine.scheduler.running)


@pytest.mark.parametrize("logprobs", [None, 0], ids=["device-argmax", "host-sampler"])
@pytest.mark.parametrize("max_tokens", [1, 2, 3])
def test_a_prompt_is_cached_however_soon_its_request_ends(
    tiny_model: Path, hf_greedy: HfGreedy, max_tokens: int, logprobs: int | None
) -> None:
    """A request that ends in its first engine steps still leaves its prompt's full blocks:
    the same prompt right after is served 48 of its 50 tokens from the cache."""
    engine = _engine(tiny_model)
    prompt = _prompt(50, seed=max_tokens)
    params = _greedy(max_tokens, logprobs=logprobs)
    first = engine.generate([prompt], params)[0]
    assert first.num_cached_tokens == 0 and engine.stats().prefix_cache_hits == 0
    second = engine.generate([prompt], params)[0]
    assert second.num_cached_tokens == 48
    assert engine.stats().prefix_cache_hits == 48
    assert (
        first.new_token_ids
        == second.new_token_ids
        == hf_greedy(tiny_model, [prompt], max_tokens)[0]
    )
    _check_pool(engine)


def test_a_request_stopped_by_its_first_token_leaves_its_prompt_cached(
    tiny_model: Path, hf_greedy: HfGreedy
) -> None:
    prompt = _prompt(40, seed=11)
    first_token = hf_greedy(tiny_model, [prompt], 1)[0][0]
    engine = _engine(tiny_model)
    stopped = engine.generate([prompt], _greedy(8, stop_token_ids=[first_token]))[0]
    assert stopped.finish_reason == "stop" and stopped.new_token_ids == [first_token]
    assert engine.generate([prompt], _greedy(2))[0].num_cached_tokens == 32


def test_a_prompt_prefilled_in_chunks_is_cached_up_to_its_last_full_block(
    tiny_model: Path, hf_greedy: HfGreedy
) -> None:
    """Chunks of 32 tokens: the last chunk (64..83) completes block 4 in the request's last
    step; that block is named as well as those of the earlier chunks."""
    engine = _engine(tiny_model, max_num_batched_tokens=32)
    prompt = _prompt(83, seed=12)
    first = engine.generate([prompt], _greedy(1))[0]
    second = engine.generate([prompt], _greedy(1))[0]
    assert second.num_cached_tokens == 80
    assert first.new_token_ids == second.new_token_ids == hf_greedy(tiny_model, [prompt], 1)[0]
    _check_pool(engine)


def test_an_aborted_prefill_leaves_only_its_computed_full_blocks_cached(
    tiny_model: Path, hf_greedy: HfGreedy
) -> None:
    """Aborted after a first chunk of 40 tokens: blocks 0 and 1 are full and computed; block 2
    holds 8 computed tokens and is not named, nor is anything of the 60 never computed."""
    engine = _engine(tiny_model, max_num_batched_tokens=40)
    prompt = _prompt(100, seed=13)
    engine.add_request("aborted", prompt, _greedy(4))
    engine.step()
    engine.abort_request("aborted")
    assert _cached_tokens(engine, prompt) == 32
    assert len(engine.pool.cached) == 2
    again = engine.generate([prompt], _greedy(4))[0]
    assert again.num_cached_tokens == 32
    assert again.new_token_ids == hf_greedy(tiny_model, [prompt], 4)[0]
    _check_pool(engine)


def test_an_aborted_decode_leaves_the_block_its_generated_tokens_filled(
    tiny_model: Path, hf_greedy: HfGreedy
) -> None:
    """A 45-token prompt: the fourth step computes token 47, whose id was still on the device
    when that step launched, and so completes block 2 with three generated tokens. Aborted
    right after, the request leaves that block named (its ids known by then), and a prompt
    that continues the same text is served all three blocks."""
    engine = _engine(tiny_model)
    prompt = _prompt(45, seed=14)
    engine.add_request("aborted", prompt, _greedy(12))
    generated = _tokens(engine, steps=4)["aborted"]
    engine.abort_request("aborted")
    assert len(generated) == 3
    _check_pool(engine)
    follow_up = [*prompt, *generated, 7]
    assert _cached_tokens(engine, follow_up) == 48
    out = engine.generate([follow_up], _greedy(6))[0]
    assert out.num_cached_tokens == 48
    assert out.new_token_ids == hf_greedy(tiny_model, [follow_up], 6)[0]


def test_a_request_preempted_right_after_its_prefill_keeps_its_prompt_cached(
    tiny_model: Path, hf_greedy: HfGreedy
) -> None:
    """Four blocks for two prompts of two blocks each: in the second step the newer request
    needs a third block and is preempted, before it ever decoded. Its two computed prompt
    blocks stay named; it resumes from them and its tokens are still those of transformers."""
    engine = _engine(tiny_model, num_kv_blocks=4)
    older, newer = _prompt(31, seed=15), _prompt(32, seed=16)
    engine.add_request("older", older, _greedy(2))
    engine.add_request("newer", newer, _greedy(6))
    got = _tokens(engine, steps=2)
    (waiting,) = engine.scheduler.waiting
    assert waiting.request_id == "newer" and waiting.status is SequenceStatus.WAITING
    assert engine.stats().num_preemptions == 1
    assert _cached_tokens(engine, [*newer, 0]) == 32
    for rid, tokens in _tokens(engine).items():
        got[rid] = got.get(rid, []) + tokens
    want = hf_greedy(tiny_model, [older, newer], 6)
    assert got == {"older": want[0][:2], "newer": want[1]}
    assert engine.generate([newer], _greedy(1))[0].num_cached_tokens == 16  # 31 // 16 blocks
    _check_pool(engine)
