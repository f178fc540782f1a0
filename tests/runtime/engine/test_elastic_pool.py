"""The elastic KV pool: grown toward the limit and shrunk back to the request while it serves.

One grow/shrink schedule, run on the CPU build in CI and on the GPU (CUDA virtual memory, decode
CUDA graphs) on the device: every request completes, greedy outputs are token-identical to a run
on a pool that never changes, shrinks preempt (and recompute) the sequences in the region given
back, and on the GPU the decode graphs captured at start-up keep being replayed after a shrink.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from berth.runtime.engine import Engine, EngineConfig, SamplingParams
from berth.runtime.engine.budget import GpuBudget
from berth.runtime.engine.kv_arena import MAX_PIECE_BYTES, MIN_CHUNKS, KvArena, KvLayout, coarsened

# (engine step, "limit" | "request"): when the pool grows to the limit or shrinks back.
SCHEDULE = [(3, "limit"), (8, "request"), (12, "limit"), (16, "request"), (24, "limit"),
            (30, "request")]  # fmt: skip


@dataclass(frozen=True)
class Load:
    """Requests (prompts of ``prompt_len + i`` tokens) and the budget, in KV chunks, chosen so
    that everything fits at the limit and not at the request."""

    device: str
    num_seqs: int
    prompt_len: int
    max_tokens: int
    request_chunks: int
    limit_chunks: int
    dtype: str = "float32"


CPU_LOAD = Load("cpu", 8, 20, 24, 2, 6)  # chunks of 8 blocks
GPU_LOAD = Load("cuda", 64, 300, 120, 1, 3)  # chunks of 1,024 blocks (2 MiB per slab)


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


def _run(
    engine: Engine, load: Load, schedule: list[tuple[int, str]]
) -> tuple[dict[str, list[int]], int]:
    """Serve the load, resizing as scheduled; the tokens per request, and the decode graphs
    replayed after the last resize."""
    params = SamplingParams(max_tokens=load.max_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(_prompts(load)):
        engine.add_request(str(i), prompt, params)
    plan, targets = engine.runner.plan, dict(schedule)
    replays_at_last_resize = engine.runner.num_graph_replays
    tokens: dict[str, list[int]] = {}
    finished: set[str] = set()
    step = 0
    while engine.has_unfinished():
        if step in targets:
            assert plan is not None
            budget = plan.budget
            target = budget.limit_bytes if targets[step] == "limit" else budget.request_bytes
            held = engine.resize_kv_memory(target)
            replays_at_last_resize = engine.runner.num_graph_replays
            assert held <= target
            engine.pool.check_invariants(engine.scheduler.running)
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                assert out.finish_reason == "length", out
                finished.add(out.request_id)
        step += 1
    assert len(finished) == load.num_seqs
    return tokens, engine.runner.num_graph_replays - replays_at_last_resize


def _elastic_engine(model: Path, load: Load) -> Engine:
    """An engine whose budget holds the load's request chunks beside what an engine of the
    same shape measured (half a chunk of slack for measurement noise), its limit chunks at most. On
    the GPU the first engine of a process measures more (its CUDA context loads the kernels),
    so the budget is taken from a second one, as every later engine here measures."""
    probe = Engine(_config(model, load, num_kv_blocks=16))
    footprint, chunk = probe.runner.footprint, probe.runner.layout.chunk_bytes
    for _ in range(2 if load.device == "cuda" else 1):
        del probe
        gc.collect()  # the dropped engine's KV mappings and graph pools go back
        if load.device == "cuda":
            torch.cuda.empty_cache()
        base = footprint.weights_bytes + footprint.workspace_bytes + chunk // 2
        budget = GpuBudget(base + load.request_chunks * chunk, base + load.limit_chunks * chunk)
        probe = Engine(_config(model, load, budget=budget))
        footprint = probe.runner.footprint
    return probe


def _check_schedule(model: Path, load: Load) -> Engine:
    elastic = _elastic_engine(model, load)
    arena = elastic.runner.arena
    print("footprint", elastic.runner.footprint, "plan", elastic.runner.plan)
    assert arena.num_chunks == load.request_chunks, "the pool starts at the request"
    assert elastic.runner.plan is not None
    assert elastic.runner.plan.limit_chunks == load.limit_chunks
    reference = Engine(_config(model, load, num_kv_blocks=arena.max_blocks))
    expected, _ = _run(reference, load, [])
    got, replays_after_shrink = _run(elastic, load, SCHEDULE)
    assert got == expected, "resizing changed greedy outputs"
    assert elastic.stats().num_preemptions > 0, "no shrink had to preempt: the test is too light"
    assert arena.num_chunks == load.request_chunks
    assert arena.num_remaps >= 6 * (load.limit_chunks - load.request_chunks)
    assert elastic.stats().held_bytes <= elastic.runner.plan.budget.request_bytes  # type: ignore[union-attr]
    if elastic.runner.graphs:
        assert replays_after_shrink >= 50, "decode steps after the last shrink ran eagerly"
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
    print("graph replays in all", engine.runner.num_graph_replays)


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


LLAMA_3_8B = KvLayout(32, 16, 8, 128, 2, 2 << 20)  # 32 KiB slab blocks: 2 MiB pieces


@pytest.mark.parametrize(
    ("kv_gib", "piece_mib", "chunks"),
    [(29, 8, 58), (8, 4, 32), (4, 2, 32), (1, 2, 8), (64, 32, 32), (120, 32, 60)],
)
def test_a_gpu_pool_is_cut_into_fewer_larger_pieces_but_enough_chunks(
    kv_gib: int, piece_mib: int, chunks: int
) -> None:
    kv = kv_gib << 30
    layout = coarsened(LLAMA_3_8B, kv)
    piece = layout.piece_bytes
    assert piece == layout.chunk_blocks * layout.slab_block_bytes
    assert piece == piece_mib << 20 and kv // layout.chunk_bytes == chunks
    assert layout.granularity % LLAMA_3_8B.granularity == 0
    assert piece <= MAX_PIECE_BYTES
    if piece > LLAMA_3_8B.granularity:  # coarsened only while MIN_CHUNKS still fit
        assert kv // layout.chunk_bytes >= MIN_CHUNKS


def test_coarsening_keeps_fp8_scale_pieces_whole() -> None:
    fp8 = KvLayout(32, 16, 8, 128, 1, 2 << 20, fp8=True)
    layout = coarsened(fp8, 29 << 30)
    assert layout.granularity > fp8.granularity
    for piece in (layout.slab_block_bytes, layout.scale_block_bytes):
        assert (layout.chunk_blocks * piece) % layout.granularity == 0


def test_growth_the_device_refuses_keeps_the_pool_and_is_logged_once_per_stall(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The driver out of memory (a neighbour holding more than its grant): the pool keeps what
    it has, and the lease's retry every cycle does not repeat the warning until it changes."""
    engine = _elastic_engine(tiny_model, CPU_LOAD)
    arena = engine.runner.arena
    grow = arena.resize
    refuse_past = [CPU_LOAD.request_chunks]

    def resize(chunks: int) -> None:
        if chunks > refuse_past[0]:
            grow(refuse_past[0])
            raise RuntimeError("cuMemCreate failed: CUDA_ERROR_OUT_OF_MEMORY")
        grow(chunks)

    monkeypatch.setattr(arena, "resize", resize)
    limit_blocks = CPU_LOAD.limit_chunks * arena.layout.chunk_blocks
    with caplog.at_level(logging.WARNING, logger="berth.runtime.engine.engine"):
        for _ in range(3):
            engine.resize_kv_pool(limit_blocks)
        assert arena.num_chunks == CPU_LOAD.request_chunks
        assert engine.pool.num_blocks == arena.num_blocks
        refuse_past[0] += 1  # a little more room, then stuck again: a new stall
        for _ in range(3):
            engine.resize_kv_pool(limit_blocks)
    stalls = [r.getMessage() for r in caplog.records if "stopped growing" in r.getMessage()]
    assert stalls == [
        f"KV pool stopped growing at {n} chunks: cuMemCreate failed: CUDA_ERROR_OUT_OF_MEMORY"
        for n in (CPU_LOAD.request_chunks, CPU_LOAD.request_chunks + 1)
    ]
    assert engine.pool.num_blocks == (CPU_LOAD.request_chunks + 1) * arena.layout.chunk_blocks


def test_the_runner_copies_whole_blocks_for_copy_on_write(tiny_model: Path) -> None:
    """``ModelRunner.copy_blocks``: each (source, destination) pair copies the source block's
    keys and values in every layer; the other blocks stay as they were."""
    engine = Engine(EngineConfig(model=str(tiny_model), device="cpu", dtype="float32",
                                 kv_cache_bytes=8 << 20))  # fmt: skip
    kv = engine.runner.arena.tensor
    kv.zero_()
    kv[:, :, 3].normal_()
    engine.runner.copy_blocks([(3, 5), (3, 6)])
    assert torch.equal(kv[:, :, 5], kv[:, :, 3]) and torch.equal(kv[:, :, 6], kv[:, :, 3])
    assert kv[:, :, 4].eq(0).all() and kv[:, :, 7].eq(0).all() and kv[:, :, 3].ne(0).any()
