"""Warm standby in the engine: park gives the weights' and KV's memory back, wake restores them.

On the CPU build the weights' storage is really freed and refilled from the host copy, so these
tests prove the outputs come back exactly; on the GPU the same schedule runs over CUDA virtual
memory with the decode graphs captured at load, which must keep replaying after each wake.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from berth.runtime.engine import Engine, EngineConfig, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS: list[str | list[int]] = [
    [(7 * i + 3 * j) % 400 + 1 for j in range(9 + i)] for i in range(5)
]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _engine(model: Path, device: str, standby: bool = True) -> Engine:
    return Engine(
        EngineConfig(model=str(model), device=device, dtype="float32", max_num_seqs=8,
                     standby=standby)
    )  # fmt: skip


def _tokens(engine: Engine) -> list[list[int]]:
    return [out.new_token_ids for out in engine.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module", params=DEVICES)
def standby_engine(request: pytest.FixtureRequest, tiny_model: Path) -> Engine:
    return _engine(tiny_model, request.param)


def test_park_wake_cycles_keep_greedy_outputs_identical(standby_engine: Engine) -> None:
    engine = standby_engine
    expected = _tokens(engine)
    replays = engine.runner.num_graph_replays
    for _ in range(3):
        engine.park()
        assert engine.parked
        engine.wake()
        assert not engine.parked
        assert _tokens(engine) == expected
    if engine.runner.graphs:  # the graphs captured at load replay over the remapped memory
        assert engine.runner.num_graph_replays > replays


def test_park_frees_the_weights_storage_and_the_kv_pool(standby_engine: Engine) -> None:
    engine = standby_engine
    runner = engine.runner
    weights = runner.weight_arena
    param = next(runner.model.parameters())
    address = param.data_ptr()
    engine.park()
    try:
        assert engine.pool.num_blocks == 0
        assert runner.arena.num_chunks == 0
        assert weights.mapped_bytes == 0
        assert engine.stats().kv_cache_bytes == 0
        if runner.device.type == "cpu":  # the host memory itself is freed
            assert weights.flat.untyped_storage().nbytes() == 0
            assert runner.kv_cache.untyped_storage().nbytes() == 0
    finally:
        engine.wake()
    assert weights.mapped_bytes == weights.flat.numel()
    assert engine.pool.num_blocks > 0
    if runner.device.type == "cuda":  # same virtual addresses: graphs stay valid
        assert param.data_ptr() == address


def test_sequences_running_at_park_are_preempted_and_finish_after_wake(
    standby_engine: Engine,
) -> None:
    engine = standby_engine
    expected = _tokens(engine)
    ids = [f"p{i}" for i in range(len(PROMPTS))]
    for request_id, prompt in zip(ids, PROMPTS, strict=True):
        engine.add_request(request_id, prompt, GREEDY)
    got: dict[str, list[int]] = {i: [] for i in ids}
    for _ in range(3):  # prefill and a few decode steps
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    preempted = engine.park()
    assert preempted == len(ids)
    assert engine.has_unfinished()
    with pytest.raises(RuntimeError, match="parked"):
        engine.step()
    engine.wake()
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    assert [got[i] for i in ids] == expected


def test_requests_added_while_parked_run_after_wake(standby_engine: Engine) -> None:
    engine = standby_engine
    expected = _tokens(engine)
    engine.park()
    engine.add_request("late", PROMPTS[0], GREEDY)
    engine.wake()
    tokens: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
    assert tokens == expected[0]


def test_an_engine_without_standby_refuses_to_park(tiny_model: Path) -> None:
    engine = _engine(tiny_model, "cpu", standby=False)
    assert engine.runner.weight_arena.host is None
    with pytest.raises(RuntimeError, match="standby is off"):
        engine.park()
    assert not engine.parked
    assert engine.generate(PROMPTS[:1], GREEDY)[0].finished
