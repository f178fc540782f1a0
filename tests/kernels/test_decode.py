"""Paged decode attention: the Triton kernel against the float64 reference on fresh random data."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from paged_checks import CPU_DTYPES, GPU_DTYPES, assert_close, poisoned_like

from berth.kernels import paged_decode_attention, reference
from berth.kernels.decode import DecodeConfig, default_config, launch_decode, plan_splits
from berth.kernels.synthetic import PagedBatch, random_paged_batch


def run_decode(
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    config: DecodeConfig | None = None,
    **batch_options: bool,
) -> None:
    batch = random_paged_batch(
        seq_lens, num_kv_heads, head_dim, block_size, dtype, device, **batch_options
    )
    query = torch.randn(len(seq_lens), num_heads, head_dim, dtype=dtype, device=device)
    scale = head_dim**-0.5
    out = poisoned_like(query)
    launch_decode(
        query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, scale, out,
        max(seq_lens), config,
    )  # fmt: skip
    expected = reference.paged_decode_attention(
        query.double(), batch.k_cache.double(), batch.v_cache.double(), batch.block_tables,
        batch.seq_lens, scale,
    )  # fmt: skip
    assert_close(out, expected, dtype)


# Small steps and splits so the interpreter walks several pages, splits and a merge.
SPLIT = DecodeConfig(block_n=16, split_waves=4, min_split_tokens=16)
SINGLE = DecodeConfig(block_n=16, min_split_tokens=10**6)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("config", [SPLIT, SINGLE], ids=["split", "single"])
def test_decode_matches_reference_across_gqa_ratios(
    device: torch.device, dtype: torch.dtype, group: int, config: DecodeConfig
) -> None:
    run_decode([1, 37, 70], 2 * group, 2, 32, 16, dtype, device, config)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_handles_page_and_head_sizes(
    device: torch.device, block_size: int, head_dim: int
) -> None:
    run_decode([5, 33, 64], 4, 1, head_dim, block_size, torch.float16, device, SPLIT)


def test_decode_context_length_one_and_one_sequence(device: torch.device) -> None:
    run_decode([1], 4, 2, 32, 16, torch.float16, device, SPLIT)


def test_decode_hundreds_of_sequences(device: torch.device) -> None:
    lens = torch.randint(1, 40, (200,)).tolist()
    run_decode(lens, 2, 1, 16, 16, torch.float16, device, SINGLE)


def test_decode_page_shared_by_sequences(device: torch.device) -> None:
    run_decode([20, 17, 40], 4, 2, 32, 16, torch.float16, device, SPLIT, share_first_page=True)


def test_decode_largest_block_table(device: torch.device) -> None:
    """One sequence owning every block of the cache, its table exactly as wide as its pages."""
    run_decode(
        [16 * 12], 2, 1, 32, 16, torch.float16, device, SPLIT, spare_blocks=0, spare_columns=0
    )


@settings(max_examples=6, deadline=None)
@given(
    lens=st.lists(st.integers(1, 80), min_size=1, max_size=4),
    group=st.integers(1, 8),
    block_size=st.sampled_from([8, 16, 32]),
    block_n=st.sampled_from([16, 32]),
    min_split=st.sampled_from([16, 48]),
)
def test_decode_any_small_batch_matches_reference(
    lens: list[int], group: int, block_size: int, block_n: int, min_split: int
) -> None:
    """Any lengths, GQA ratio, page size and split plan: same function as the reference."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    block_n = max(block_n, block_size)
    config = DecodeConfig(block_n=block_n, split_waves=4, min_split_tokens=min_split)
    run_decode(lens, group, 1, 16, block_size, torch.float16, device, config)


def test_decode_default_config_and_no_max_seq_len(device: torch.device) -> None:
    batch = random_paged_batch([9, 50], 2, 32, 16, torch.float16, device)
    query = torch.randn(2, 4, 32, dtype=torch.float16, device=device)
    out = paged_decode_attention(
        query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, 0.2
    )
    expected = reference.paged_decode_attention(
        query.double(), batch.k_cache.double(), batch.v_cache.double(), batch.block_tables,
        batch.seq_lens, 0.2,
    )  # fmt: skip
    assert_close(out, expected, torch.float16)


def test_split_plan_fills_the_gpu_only_when_the_batch_cannot() -> None:
    config = DecodeConfig(block_n=64, no_split_waves=3, split_waves=8, min_split_tokens=256)
    assert plan_splits(256, 8, 4096, 132, config) == (1, 4096)
    assert plan_splits(64, 8, 2048, 132, config) == (1, 2048)
    splits, tokens = plan_splits(1, 8, 4096, 132, config)
    assert splits == 16 and tokens == 256
    splits, tokens = plan_splits(8, 8, 32768, 132, config)
    assert splits * tokens >= 32768 > (splits - 1) * tokens and tokens % 64 == 0
    assert 8 * 8 * splits <= 8 * 132


def test_default_split_plan_is_one_round_of_resident_programs() -> None:
    """About two programs per SM, rounded down: the shapes of the H100 sweep's best plans."""
    config = DecodeConfig()
    assert plan_splits(1, 8, 32768, 132, config) == (32, 1024)  # 256 programs
    assert plan_splits(16, 8, 8192, 132, config) == (2, 4096)  # 256
    assert plan_splits(8, 8, 32768, 132, config) == (4, 8192)  # 256
    assert plan_splits(1, 8, 1000, 132, config) == (8, 128)  # min_split_tokens bounds it
    for seqs in range(1, 34):  # up to one round: never more than 2 programs per SM
        splits, _ = plan_splits(seqs, 8, 32768, 132, config)
        assert seqs * 8 * splits <= 2 * 132
    # Past one round and below 3 per SM: split finely as before (8 per SM), not left with a
    # short second round (40 x 8 = 320 programs unsplit would be 264 + 56).
    assert plan_splits(40, 8, 4096, 132, config) == (4, 1024)
    assert plan_splits(50, 8, 4096, 132, config) == (1, 4096)  # 400 programs: unsplit


def test_fp8_default_splits_finer() -> None:
    """An FP8 cache keeps 8 programs per SM (its programs are smaller and more run at once)."""
    config = default_config(128, 16, fp8=True)
    assert config.split_waves == 8.0 and default_config(128, 16).split_waves == 2.0
    assert plan_splits(8, 8, 32768, 132, config) == (16, 2048)  # 1,024 programs
    assert plan_splits(16, 8, 8192, 132, config) == (8, 1024)


def _bad_inputs(device: torch.device) -> PagedBatch:
    return random_paged_batch([10, 20], 2, 32, 16, torch.float16, device)


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (lambda q, b: (q[:, :3], b), ValueError, "multiple"),
        (lambda q, b: (q[..., :16], b), ValueError, "query must be"),
        (lambda q, b: (q.float(), b), TypeError, "share one dtype"),
        (lambda q, b: (q.transpose(1, 2).contiguous().transpose(1, 2), b), ValueError, "stride"),
        (
            lambda q, b: (q, replace(b, block_tables=b.block_tables.long())),
            TypeError,
            "block_tables",
        ),
        (lambda q, b: (q, replace(b, seq_lens=b.seq_lens[:1])), ValueError, "seq_lens"),
    ],
    ids=["heads", "head_dim", "dtype", "stride", "table_dtype", "lens_shape"],
)
def test_decode_rejects_bad_inputs(device: torch.device, mutate, error, message) -> None:  # type: ignore[no-untyped-def]
    batch = _bad_inputs(device)
    query = torch.randn(2, 4, 32, dtype=torch.float16, device=device)
    query, batch = mutate(query, batch)
    with pytest.raises(error, match=message):
        paged_decode_attention(
            query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, 0.1
        )


def test_decode_rejects_cpu_tensors_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    batch = random_paged_batch([4], 1, 16, 16, torch.float16, "cpu")
    query = torch.randn(1, 1, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="CUDA"):
        paged_decode_attention(
            query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, 0.1
        )


# ---- GPU: full shapes, bf16, CUDA graphs ---------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_decode_full_shapes_on_gpu(
    device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int, group: int
) -> None:
    lens = [*torch.randint(1, 3000, (24,)).tolist(), 1, 4096]
    run_decode(lens, 8 * group, 8, head_dim, block_size, dtype, device)


@pytest.mark.gpu
def test_decode_long_context_small_batch_on_gpu(device: torch.device) -> None:
    run_decode([32768, 17001], 32, 8, 128, 16, torch.bfloat16, device)


@pytest.mark.gpu
def test_decode_hundreds_of_sequences_on_gpu(device: torch.device) -> None:
    lens = torch.randint(1, 2048, (300,)).tolist()
    run_decode(lens, 32, 8, 128, 16, torch.bfloat16, device, share_first_page=True)


@pytest.mark.gpu
def test_decode_replays_from_a_cuda_graph(device: torch.device) -> None:
    """Captured once, replayed after the inputs change in place: the graph follows the data."""
    batch = random_paged_batch([300, 1000, 2000], 8, 128, 16, torch.bfloat16, device)
    query = torch.randn(3, 32, 128, dtype=torch.bfloat16, device=device)
    out = torch.empty_like(query)
    args = (query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, 0.08, out)
    paged_decode_attention(*args, max_seq_len=2000)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(*args, max_seq_len=2000)
    query.copy_(torch.randn_like(query))
    batch.seq_lens.copy_(torch.tensor([1, 999, 1990], dtype=torch.int32))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    expected = reference.paged_decode_attention(
        query.double(), batch.k_cache.double(), batch.v_cache.double(), batch.block_tables,
        batch.seq_lens, 0.08,
    )  # fmt: skip
    assert_close(out, expected, torch.bfloat16)
