"""The elastic KV pool: grown toward the limit and shrunk back to the request while it serves.

One grow/shrink schedule, run on the CPU build in CI and on the GPU (CUDA virtual memory, decode
CUDA graphs) on the device: every request completes, greedy outputs are token-identical to a run
on a pool that never changes, shrinks preempt (and recompute) the sequences in the region given
back, and on the GPU the decode graphs captured at start-up keep being replayed after a shrink.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from berth.runtime.engine import Engine, EngineConfig, SamplingParams
from berth.runtime.engine.budget import GpuBudget
from berth.runtime.engine.kv_arena import KvArena, KvLayout

# (engine step, "limit" | "request"): when the pool grows to the limit or shrinks back.
SCHEDULE = [(3, "limit"), (8, "request"), (12, "limit"), (16, "request"), (24, "limit"),
            (30, "request")]  # fmt: skip
REQUEST_CHUNKS, LIMIT_CHUNKS = 2, 6


@dataclass(frozen=True)
class Load:
    device: str
    num_seqs: int
    prompt_len: int
    max_tokens: int
    dtype: str = "float32"


CPU_LOAD = Load("cpu", 8, 20, 24)
GPU_LOAD = Load("cuda", 48, 500, 120)  # a chunk holds 1,024 blocks of the tiny model on the GPU


def _prompts(load: Load) -> list[list[int]]:
    return [
        [(11 * i + 7 * j) % 500 + 1 for j in range(load.prompt_len + i)]
        for i in range(load.num_seqs)
    ]


def _config(model: Path, load: Load, **kw: object) -> EngineConfig:
    return EngineConfig(
        model=str(model),
        device=load.device,
        dtype=load.dtype,
        max_num_seqs=64,
        **kw,  # type: ignore[arg-type]
    )


def _run(engine: Engine, load: Load, schedule: list[tuple[int, str]]) -> dict[str, list[int]]:
    params = SamplingParams(max_tokens=load.max_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(_prompts(load)):
        engine.add_request(str(i), prompt, params)
    plan, targets = engine.runner.plan, dict(schedule)
    tokens: dict[str, list[int]] = {}
    finished: set[str] = set()
    step = 0
    while engine.has_unfinished():
        if step in targets:
            assert plan is not None
            budget = plan.budget
            target = budget.limit_bytes if targets[step] == "limit" else budget.request_bytes
            held = engine.resize_kv_memory(target)
            assert held <= target
            engine.pool.check_invariants(engine.scheduler.running)
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                assert out.finish_reason == "length", out
                finished.add(out.request_id)
        step += 1
    assert len(finished) == load.num_seqs
    return tokens


def _elastic_engine(model: Path, load: Load) -> Engine:
    """An engine whose budget holds REQUEST_CHUNKS chunks beside what a first engine of the
    same shape measured (half a chunk of slack for measurement noise), LIMIT_CHUNKS at most."""
    probe = Engine(_config(model, load, num_kv_blocks=16))
    footprint, chunk = probe.runner.footprint, probe.runner.layout.chunk_bytes
    del probe
    if load.device == "cuda":
        torch.cuda.empty_cache()
    base = footprint.weights_bytes + footprint.workspace_bytes + chunk // 2
    budget = GpuBudget(base + REQUEST_CHUNKS * chunk, base + LIMIT_CHUNKS * chunk)
    return Engine(_config(model, load, budget=budget))


def _check_schedule(model: Path, load: Load) -> Engine:
    elastic = _elastic_engine(model, load)
    arena = elastic.runner.arena
    assert arena.num_chunks == REQUEST_CHUNKS, "the pool starts at the request"
    reference = Engine(_config(model, load, num_kv_blocks=arena.max_blocks))
    expected = _run(reference, load, [])
    replays_before = elastic.runner.num_graph_replays
    got = _run(elastic, load, SCHEDULE)
    assert got == expected, "resizing changed greedy outputs"
    assert elastic.stats().num_preemptions > 0, "no shrink had to preempt: the test is too light"
    assert arena.num_chunks == REQUEST_CHUNKS and arena.num_remaps >= 4 * (LIMIT_CHUNKS - 2)
    assert elastic.stats().held_bytes <= elastic.runner.plan.budget.request_bytes  # type: ignore[union-attr]
    elastic.runner.graph_replays_since = replays_before  # type: ignore[attr-defined]
    return elastic


def test_cpu_pool_grows_and_shrinks_under_load_with_identical_greedy_outputs(
    tiny_model: Path,
) -> None:
    _check_schedule(tiny_model, CPU_LOAD)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_pool_on_cuda_virtual_memory_keeps_graphs_replaying_after_shrinks(
    tiny_model: Path,
) -> None:
    engine = _check_schedule(tiny_model, GPU_LOAD)
    assert engine.runner.graphs, "no CUDA graphs were captured"
    # The last shrink is at step 30; decode steps after it must still come from the graphs.
    after = engine.runner.num_graph_replays
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    engine.generate(_prompts(GPU_LOAD)[:8], params)
    assert engine.runner.num_graph_replays >= after + 30


def test_arena_maps_and_unmaps_whole_chunks_and_keeps_its_tensor() -> None:
    layout = KvLayout(2, 16, 3, 64, 2, 16 << 10)  # 6 KiB per slab block: chunks of 8 blocks
    assert layout.chunk_blocks == 8 and layout.chunk_bytes == 8 * layout.block_bytes
    arena = KvArena(layout, 5, torch.device("cpu"), torch.float16)
    tensor = arena.tensor
    arena.resize(3)
    assert arena.num_blocks == 24 and arena.mapped_bytes == 3 * layout.chunk_bytes
    tensor[:, :, :24] = 1.0
    arena.resize(1)
    arena.resize(2)
    assert arena.tensor is tensor and tensor.shape[2] == 40
    assert float(tensor[:, :, 8:16].abs().sum()) == 0.0, "a remapped chunk reads as zeros"
    assert float(tensor[:, :, :8].float().sum()) == 8 * 16 * 3 * 64 * 2 * 2, (
        "chunk 0 kept its content"
    )
    with pytest.raises(ValueError, match="num_chunks"):
        arena.resize(6)
