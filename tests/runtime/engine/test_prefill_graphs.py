"""Prefill and mixed steps as CUDA graphs: the padding that gives every step of a bucket one
shape (checked on the CPU through the real model and the reference kernels), and on the GPU
the graphed steps against eager ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from berth.runtime.engine import Engine, EngineConfig, SamplingParams, model_runner
from berth.runtime.engine.model import AttentionMetadata
from berth.runtime.engine.model_runner import (
    PENDING,
    StepInputs,
    pad_step,
    prefill_graph_sizes,
    step_inputs,
)
from berth.runtime.engine.scheduler import ScheduledBatch
from berth.runtime.engine.sequence import Sequence


def test_graph_sizes_cover_every_step_up_to_the_budget_with_bounded_padding() -> None:
    assert prefill_graph_sizes(2048, 0) == []
    for budget in (16, 100, 512, 2048, 8192):
        sizes = prefill_graph_sizes(budget, 2048)
        assert sizes == sorted(set(sizes))
        assert sizes[-1] == min(budget, 2048)
        for t in range(1, sizes[-1] + 1):
            padded = next(s for s in sizes if s >= t)
            assert padded - t < max(t, 128), (budget, t, padded)


def _step(seqs: list[tuple[int, int]], block_size: int, tables: list[list[int]]) -> StepInputs:
    """``seqs``: (tokens already cached, new tokens) per sequence."""
    ids, positions, slots, starts, lens, rows = [], [], [], [0], [], []
    for i, (cached, new) in enumerate(seqs):
        pos = np.arange(cached, cached + new)
        ids += [(17 * i + int(p)) % 200 + 3 for p in pos]
        positions.append(pos)
        slots.append(np.asarray(tables[i])[pos // block_size] * block_size + pos % block_size)
        starts.append(starts[-1] + new)
        lens.append(cached + new)
        rows.append(starts[-1] - 1)
    tokens = np.stack([np.asarray(ids), np.concatenate(positions), np.concatenate(slots)])
    return StepInputs(
        tokens.astype(np.int64), np.asarray(starts, np.int32), np.asarray(lens, np.int32), rows
    )


def test_step_inputs_of_a_mixed_batch_are_those_built_sequence_by_sequence() -> None:
    """Decodes (one token after their cached ones, the last one sampled), a chunk in the
    middle of a prompt (not sampled) and a prompt's last chunk (sampled)."""
    bs = 4
    shapes = [(9, 1, 10), (0, 6, 14), (4, 3, 7), (17, 1, 18)]  # (cached, new, prompt length)
    tables = [[3, 0, 5, 9, 1], [2, 6, 8, 4], [7, 10], [11, 12, 13, 14, 15]]
    seqs = []
    for i, (cached, _, length) in enumerate(shapes):
        ids = [(17 * i + p) % 200 + 3 for p in range(length)]
        seq = Sequence(str(i), ids, length, SamplingParams(), length + 4)
        seq.num_computed_tokens, seq.block_table = cached, tables[i]
        seqs.append(seq)
    host = np.zeros((4, 6), dtype=np.int32)
    for i, t in enumerate(tables):
        host[i, : len(t)] = t
    got = step_inputs(ScheduledBatch(seqs, [n for _, n, _ in shapes]), host, bs)
    want = _step([(c, n) for c, n, _ in shapes], bs, tables)
    assert (got.tokens == want.tokens).all()
    assert got.query_start_loc.tolist() == want.query_start_loc.tolist()
    assert got.seq_lens.tolist() == want.seq_lens.tolist()
    assert got.sample_rows == [0, 9, 10]  # the chunk mid-prompt (rows 1-6) samples nothing


def test_pad_step_appends_one_self_attending_sequence_and_empty_ones() -> None:
    step = _step([(0, 5), (16, 3)], 16, [[0, 1], [2, 3]])
    padded = pad_step(step, 16, 5)
    assert padded.tokens.shape == (3, 16)
    assert (padded.tokens[:, :8] == step.tokens).all()
    assert (padded.tokens[2, 8:] == -1).all()  # padding writes nowhere
    assert padded.query_start_loc.tolist() == [0, 5, 8, 16, 16, 16]
    assert padded.seq_lens.tolist() == [5, 19, 8, 0, 0]  # the padding: 8 tokens, no prefix
    exact = pad_step(step, 8, 2)  # no padding tokens: no padding sequence
    assert exact.query_start_loc.tolist() == [0, 5, 8] and exact.seq_lens.tolist() == [5, 19]
    with pytest.raises(ValueError, match="does not fit"):
        pad_step(step, 7, 5)
    with pytest.raises(ValueError, match="does not fit"):
        pad_step(step, 16, 2)  # no room for the padding sequence


def _run(engine: Engine, step: StepInputs, table: torch.Tensor) -> torch.Tensor:
    meta = AttentionMetadata(
        slot_mapping=torch.from_numpy(step.tokens[2]),
        block_tables=table,
        seq_lens=torch.from_numpy(step.seq_lens),
        query_start_loc=torch.from_numpy(step.query_start_loc),
        max_seq_len=int(step.seq_lens.max()),
    )
    tokens = torch.from_numpy(step.tokens)
    with torch.inference_mode():
        return engine.runner.model(tokens[0], tokens[1], meta)


def test_a_padded_mixed_step_computes_what_the_step_computes(tiny_model: Path) -> None:
    """A prefill from scratch, a chunk over a cached prefix and a decode token in one step:
    padded to 64 tokens and 8 sequences, the real tokens' hidden states and the KV cache are
    those of the unpadded step."""
    engine = Engine(EngineConfig(model=str(tiny_model), device="cpu", dtype="float32"))
    bs = engine.runner.block_size
    tables = [[1, 2], [3, 4], [5, 6]]
    table = torch.tensor(tables, dtype=torch.int32)
    _run(engine, _step([(0, 20), (0, 9)], bs, tables[1:]), table[1:])  # the prefixes
    cache = engine.runner.kv_cache
    before = cache.clone()
    step = _step([(0, 13), (20, 4), (9, 1)], bs, tables)
    want = _run(engine, step, table)
    want_cache = cache.clone()
    cache.copy_(before)
    padded = pad_step(step, 64, 8)
    padded_table = torch.zeros((8, 2), dtype=torch.int32)
    padded_table[:3] = table
    got = _run(engine, padded, padded_table)
    torch.testing.assert_close(got[: step.num_tokens], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(cache, want_cache)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
def test_graphed_prefill_and_mixed_steps_match_eager(tiny_model: Path) -> None:
    """Staggered prompts (so prefill chunks run beside decodes) with a shared prefix (so
    chunks read a cached prefix): the graphed engine replays prefill graphs and its greedy
    outputs equal the eager engine's."""
    shared = [(5 * j) % 300 + 2 for j in range(40)]
    prompts = [shared + [(7 * i + j) % 400 + 1 for j in range(3 + 11 * i)] for i in range(12)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    kw = {
        "model": str(tiny_model),
        "device": "cuda",
        "dtype": "float32",
        "max_num_seqs": 16,
        "max_num_batched_tokens": 256,
        "kv_cache_bytes": 64 << 20,
    }
    outputs: dict[bool, dict[str, list[int]]] = {}
    torch.backends.cuda.matmul.allow_tf32 = False
    for eager in (False, True):
        engine = Engine(EngineConfig(**kw, enforce_eager=eager))  # type: ignore[arg-type]
        tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, params)
            for out in engine.step():  # one arrival per step: prompts prefill beside decodes
                tokens[out.request_id] += out.new_token_ids
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id] += out.new_token_ids
        outputs[eager] = tokens
        if not eager:
            assert engine.runner.num_prefill_graph_replays >= len(prompts) // 2
            assert engine.runner.prefill_graph_sizes[-1] == 256
            assert engine.scheduler.step_sizes == engine.runner.prefill_graph_sizes
    graphed, eager_out = outputs[False], outputs[True]
    assert all(len(t) == 12 for t in graphed.values())
    # The graphs run the fused (compiled) pointwise ops, eager steps torch's: fp32 rounding
    # may flip a near-tie late in a random model's output, not its first tokens.
    firsts = sum(graphed[r][0] == eager_out[r][0] for r in graphed)
    same = sum(x == y for r in graphed for x, y in zip(graphed[r], eager_out[r], strict=True))
    assert firsts >= len(prompts) - 1 and same >= 0.9 * 12 * len(prompts), (graphed, eager_out)


def test_step_inputs_name_the_decode_inputs_still_on_the_device() -> None:
    """A mixed step launched before the previous step's tokens are back: each decoding
    sequence's input is a placeholder, found with its batch row."""
    a = Sequence("a", [5, 6, 7, PENDING], 3, SamplingParams(), 10)
    a.num_computed_tokens, a.block_table = 3, [0]
    b = Sequence("b", [8, 9, 10, 11, 12], 5, SamplingParams(), 10)
    b.num_computed_tokens, b.block_table = 0, [1, 2]
    c = Sequence("c", [4, 4, PENDING], 2, SamplingParams(), 10)
    c.num_computed_tokens, c.block_table = 2, [3]
    host = np.array([[0, 0], [1, 2], [3, 0]], dtype=np.int32)
    step = step_inputs(ScheduledBatch([a, b, c], [1, 5, 1]), host, 4)
    assert step.tokens[0].tolist() == [PENDING, 8, 9, 10, 11, 12, PENDING]
    assert (step.pending_at, step.pending_rows) == ([0, 6], [0, 2])
    padded = pad_step(step, 16, 5)
    assert (padded.pending_at, padded.pending_rows) == ([0, 6], [0, 2])


def test_prompts_arriving_beside_decodes_give_what_each_gives_alone(tiny_model: Path) -> None:
    """One arrival per step, so every step after the first is a mixed one launched before the
    previous step's tokens are collected: its decodes read their inputs from the device. The
    greedy outputs are those of each prompt run alone."""
    prompts = [[(7 * i + j) % 400 + 1 for j in range(5 + 9 * i)] for i in range(6)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    config = EngineConfig(model=str(tiny_model), device="cpu", dtype="float32")
    single = Engine(config)
    alone = [single.generate([p], params)[0].new_token_ids for p in prompts]
    engine = Engine(config)  # a prefix cache of its own
    pending_steps = 0
    real = step_inputs

    def counting(batch: ScheduledBatch, tables: np.ndarray, block_size: int) -> StepInputs:
        nonlocal pending_steps
        step = real(batch, tables, block_size)
        pending_steps += bool(step.pending_at)
        return step

    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_runner, "step_inputs", counting)
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, params)
            for out in engine.step():
                tokens[out.request_id] += out.new_token_ids
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id] += out.new_token_ids
    assert pending_steps >= len(prompts) - 2
    assert [tokens[str(i)] for i in range(len(prompts))] == alone
