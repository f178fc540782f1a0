"""Paged prefill / extend attention: the Triton kernel against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from paged_checks import CPU_DTYPES, GPU_DTYPES, assert_close, poison_chunk_slots, poisoned_like

from berth.kernels import paged_prefill_attention, prefill, reference, write_kv_cache
from berth.kernels.prefill import PrefillConfig, launch_prefill
from berth.kernels.synthetic import random_paged_batch


def run_prefill(
    seq_lens: list[int],
    query_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    config: PrefillConfig | None = None,
    self_kv: bool = False,
    **batch_options: bool,
) -> None:
    """Each sequence's last ``query_lens[b]`` cached tokens are its new queries. With
    ``self_kv`` their K/V go in as key/value and their cache slots hold NaN, so a kernel that
    reads them from the pages fails."""
    batch = random_paged_batch(
        seq_lens, num_kv_heads, head_dim, block_size, dtype, device, **batch_options
    )
    starts = torch.tensor([0, *query_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    query_start_loc = starts.to(device)
    query = torch.randn(sum(query_lens), num_heads, head_dim, dtype=dtype, device=device)
    scale = head_dim**-0.5
    expected = reference.paged_prefill_attention(
        query.double(), batch.k_cache.double(), batch.v_cache.double(), batch.block_tables,
        batch.seq_lens, query_start_loc, scale,
    )  # fmt: skip
    key = value = None
    if self_kv:
        key, value = batch.chunk_kv(query_lens)
        poison_chunk_slots(batch, query_lens)
    out = poisoned_like(query)
    args = (query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens)
    launch_prefill(*args, query_start_loc, scale, out, config, key, value)
    assert_close(out, expected, dtype)


SMALL = PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=2)
WIDE = PrefillConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)
# Paged steps twice the band's, as in the default config: a prefix can end mid paged step.
SPLIT = PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=2, paged_block_n=32)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("config", [SMALL, WIDE, SPLIT], ids=["16x16", "32x32", "16x16/32"])
@pytest.mark.parametrize("self_kv", [False, True], ids=["cache", "key_value"])
def test_prefill_mixed_batch_matches_reference(
    device: torch.device, dtype: torch.dtype, group: int, config: PrefillConfig, self_kv: bool
) -> None:
    """A fresh prompt, a chunk after a cached prefix, and two decode tokens in one launch; the
    chunks' own K/V read from the cache or from key/value."""
    run_prefill(
        [21, 45, 9, 1], [21, 13, 1, 1], 2 * group, 2, 32, 16, dtype, device, config, self_kv
    )


@pytest.mark.parametrize("prefix", [0, 5, 16, 31, 32, 47, 64])
def test_prefill_key_value_after_any_prefix_length(device: torch.device, prefix: int) -> None:
    """Prefixes ending mid band step, mid paged step and on step edges: cached keys from the
    pages (straddling steps by row pointers), the chunk's own only from key/value (TMA)."""
    run_prefill([prefix + 40], [40], 4, 2, 16, 16, torch.float16, device, SPLIT, self_kv=True)


def test_prefill_batch_wider_than_one_sequence_search_step(device: torch.device) -> None:
    """70 sequences: the tile-to-sequence search takes two 64-wide steps."""
    lens = torch.randint(1, 12, (70,)).tolist()
    run_prefill(lens, [min(n, 3) for n in lens], 2, 1, 16, 16, torch.float16, device, SMALL)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("config", [SMALL, WIDE], ids=["16x16", "32x32"])
def test_prefill_page_sizes_and_ragged_lengths(
    device: torch.device, block_size: int, config: PrefillConfig
) -> None:
    run_prefill([33, 70], [33, 20], 4, 2, 64, block_size, torch.float16, device, config)
    run_prefill([33, 70], [33, 20], 4, 2, 64, block_size, torch.float16, device, config, True)


@pytest.mark.parametrize("self_kv", [False, True], ids=["cache", "key_value"])
def test_prefill_band_wider_than_a_key_step(device: torch.device, self_kv: bool) -> None:
    """32 queries per tile against 16-key steps: the causal band spans up to three steps after
    a prefix that ends mid-step (the band's first step runs before the others)."""
    config = PrefillConfig(block_m=32, block_n=16, num_warps=4, num_stages=2)
    run_prefill([45, 38], [38, 38], 2, 2, 16, 16, torch.float16, device, config, self_kv)


def test_prefill_value_cache_with_other_strides(device: torch.device) -> None:
    """V laid out heads-first (a strided view): K's offsets cannot serve V."""
    batch = random_paged_batch([40, 23], 2, 32, 16, torch.float16, device)
    num_blocks, block_size, kv_heads, dim = batch.v_cache.shape
    v_cache = torch.empty(num_blocks, kv_heads, block_size, dim, dtype=torch.float16)
    v_cache = v_cache.to(device).transpose(1, 2)
    v_cache.copy_(batch.v_cache)
    assert v_cache.stride() != batch.k_cache.stride()
    query = torch.randn(30, 4, dim, dtype=torch.float16, device=device)
    qsl = torch.tensor([0, 17, 30], dtype=torch.int32, device=device)
    args = (batch.k_cache, v_cache, batch.block_tables, batch.seq_lens, qsl, dim**-0.5)
    out = launch_prefill(query, *args, poisoned_like(query), SMALL)
    expected = reference.paged_prefill_attention(
        query.double(), batch.k_cache.double(), batch.v_cache.double(), batch.block_tables,
        batch.seq_lens, qsl, dim**-0.5,
    )  # fmt: skip
    assert_close(out, expected, torch.float16)


def test_prefill_wide_index_path(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    """Caches past 2**31 elements index in 64 bits; forced here on a small cache."""
    monkeypatch.setattr(prefill, "WIDE_INDEX_FROM", 0)
    run_prefill([45, 9], [13, 9], 4, 2, 32, 16, torch.float16, device, SMALL)
    run_prefill([45, 9], [13, 9], 4, 2, 32, 16, torch.float16, device, SPLIT, self_kv=True)


def test_prefill_rejects_non_positive_scale(device: torch.device) -> None:
    """The kernel folds the scale into the running max, which assumes it is positive."""
    batch = random_paged_batch([8], 1, 16, 16, torch.float16, device)
    query = torch.randn(8, 1, 16, dtype=torch.float16, device=device)
    qsl = torch.tensor([0, 8], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="scale"):
        paged_prefill_attention(
            query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, qsl, 0.0
        )


@pytest.mark.parametrize("self_kv", [False, True], ids=["cache", "key_value"])
def test_prefill_shared_prefix_page(device: torch.device, self_kv: bool) -> None:
    run_prefill(
        [30, 30, 19], [14, 14, 3], 4, 2, 32, 16, torch.float16, device, SMALL, self_kv,
        share_first_page=True,
    )  # fmt: skip


def test_prefill_empty_chunk_is_skipped(device: torch.device) -> None:
    """A sequence with no new tokens in the batch (q_len 0) neither reads nor writes."""
    run_prefill([12, 40], [0, 5], 2, 1, 16, 16, torch.float16, device, SMALL)
    run_prefill([12, 40], [0, 5], 2, 1, 16, 16, torch.float16, device, SMALL, self_kv=True)


@pytest.mark.parametrize("self_kv", [False, True], ids=["cache", "key_value"])
def test_prefill_default_config(device: torch.device, self_kv: bool) -> None:
    run_prefill([40, 7], [40, 7], 8, 2, 32, 16, torch.float16, device, None, self_kv)


def test_prefill_key_value_views_as_the_engine_passes_them(device: torch.device) -> None:
    """V as a view of a fused QKV projection (row stride past Hkv * D) is read in place; K with
    its heads apart (a transposed view) is packed by the launcher first."""
    batch = random_paged_batch([50, 21], 2, 16, 16, torch.float16, device)
    query_lens = [30, 21]
    query = torch.randn(51, 4, 16, dtype=torch.float16, device=device)
    qsl = torch.tensor([0, 30, 51], dtype=torch.int32, device=device)
    args = (batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, qsl, 0.25)
    expected = reference.paged_prefill_attention(
        query.double(), batch.k_cache.double(), batch.v_cache.double(), batch.block_tables,
        batch.seq_lens, qsl, 0.25,
    )  # fmt: skip
    key, value = batch.chunk_kv(query_lens)
    poison_chunk_slots(batch, query_lens)
    qkv = torch.randn(51, (4 + 2 + 2) * 16, dtype=torch.float16, device=device)
    value_view = qkv[:, 6 * 16 :].view(51, 2, 16)
    value_view.copy_(value)
    key_apart = key.transpose(0, 1).contiguous().transpose(0, 1)  # [T, Hkv, D], heads apart
    assert key_apart.stride(1) != 16 and value_view.stride(0) == 8 * 16
    out = paged_prefill_attention(query, *args, key=key_apart, value=value_view)
    assert_close(out, expected, torch.float16)


def test_prefill_rejects_bad_key_value(device: torch.device) -> None:
    batch = random_paged_batch([8], 2, 16, 16, torch.float16, device)
    query = torch.randn(8, 2, 16, dtype=torch.float16, device=device)
    qsl = torch.tensor([0, 8], dtype=torch.int32, device=device)
    args = (query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, qsl, 0.25)
    key, value = batch.chunk_kv([8])
    with pytest.raises(ValueError, match="together"):
        paged_prefill_attention(*args, key=key)
    with pytest.raises(ValueError, match="value"):
        paged_prefill_attention(*args, key=key, value=value[:7])
    with pytest.raises(TypeError, match="key"):
        paged_prefill_attention(*args, key=key.float(), value=value)


def test_prefill_rejects_bad_query_start_loc(device: torch.device) -> None:
    batch = random_paged_batch([8, 8], 2, 32, 16, torch.float16, device)
    query = torch.randn(16, 4, 32, dtype=torch.float16, device=device)
    qsl = torch.tensor([0, 8, 16], dtype=torch.int64, device=device)
    with pytest.raises(TypeError, match="query_start_loc"):
        paged_prefill_attention(
            query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, qsl, 0.1
        )
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_prefill_attention(
            query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
            qsl[:2].int(), 0.1,
        )  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_prefill_full_shapes_on_gpu(
    device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int, group: int
) -> None:
    """Default configs, own K/V as key/value (the engine's path); prefixes of 2048 (a step
    edge), 999, 699 and 4667 (mid step) and none."""
    seq_lens = [2048, 4096, 1000, 700, 1, 5000]
    query_lens = [2048, 2048, 1, 1, 1, 333]
    run_prefill(
        seq_lens, query_lens, 8 * group, 8, head_dim, block_size, dtype, device, self_kv=True
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_prefill_full_shapes_through_pages_on_gpu(
    device: torch.device, dtype: torch.dtype, head_dim: int
) -> None:
    """The same batch with every key read through the page table (no key/value)."""
    seq_lens = [2048, 4096, 1000, 700, 1, 5000]
    query_lens = [2048, 2048, 1, 1, 1, 333]
    run_prefill(seq_lens, query_lens, 32, 8, head_dim, 16, dtype, device)


def test_write_then_prefill_equals_dense_causal_attention(device: torch.device) -> None:
    """The runtime's order, end to end: write a chunk's K/V into scattered pages with the Triton
    scatter, then attend (own K/V from the cache, then from key/value as the engine passes
    them); compare with plain causal attention over the dense sequence."""
    prefix, chunk, heads, kv_heads, dim, bs = 19, 12, 4, 2, 32, 16
    total = prefix + chunk
    keys = torch.randn(total, kv_heads, dim, dtype=torch.float16, device=device)
    values = torch.randn(total, kv_heads, dim, dtype=torch.float16, device=device)
    pages = torch.randperm(6)[: -(-total // bs)]
    k_cache = torch.full((6, bs, kv_heads, dim), float("nan"), dtype=torch.float16, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    positions = torch.arange(total)
    slots = (pages[positions // bs] * bs + positions % bs).to(device)
    write_kv_cache(keys[:prefix], values[:prefix], k_cache, v_cache, slots[:prefix])
    write_kv_cache(keys[prefix:], values[prefix:], k_cache, v_cache, slots[prefix:])
    query = torch.randn(chunk, heads, dim, dtype=torch.float16, device=device)
    args = (
        query, k_cache, v_cache, pages[None].int().to(device),
        torch.tensor([total], dtype=torch.int32, device=device),
        torch.tensor([0, chunk], dtype=torch.int32, device=device), dim**-0.5,
    )  # fmt: skip
    out = paged_prefill_attention(*args)
    out_key_value = paged_prefill_attention(*args, key=keys[prefix:], value=values[prefix:])
    expected = torch.nn.functional.scaled_dot_product_attention(
        query.double().transpose(0, 1),
        keys.double().repeat_interleave(2, dim=1).transpose(0, 1),
        values.double().repeat_interleave(2, dim=1).transpose(0, 1),
        attn_mask=(positions[None, :] <= positions[prefix:, None]).to(device),
        scale=dim**-0.5,
    ).transpose(0, 1)
    assert_close(out, expected, torch.float16)
    assert_close(out_key_value, expected, torch.float16)


def test_prefill_on_a_step_padded_as_the_engine_graphs_pad_it(device: torch.device) -> None:
    """``model_runner.pad_step``'s layout: the real sequences, one padding sequence of its own
    tokens (no prefix, garbage block-table row) and empty sequences up to the graph's count;
    the real tokens' outputs are those of the unpadded launch."""
    from berth.runtime.engine.model_runner import StepInputs, pad_step

    lens, q_lens = [21, 45, 9], [21, 13, 1]
    batch = random_paged_batch(lens, 2, 32, 16, torch.float16, device)
    key, value = batch.chunk_kv(q_lens)
    starts = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    query = torch.randn(sum(q_lens), 4, 32, dtype=torch.float16, device=device)
    args = (batch.k_cache, batch.v_cache)
    want = launch_prefill(query, *args, batch.block_tables, batch.seq_lens, starts.to(device),
                          32**-0.5, None, SPLIT, key, value)  # fmt: skip
    tokens = torch.zeros(3, sum(q_lens), dtype=torch.int64).numpy()
    step = StepInputs(tokens, starts.numpy(), batch.seq_lens.cpu().numpy(), [])
    padded = pad_step(step, 48, 9)  # 13 padding tokens, then five empty sequences
    extra = 48 - sum(q_lens)
    pad_q = torch.cat([query, torch.randn(extra, 4, 32, dtype=torch.float16, device=device)])
    pad_k = torch.cat([key, torch.randn(extra, 2, 32, dtype=torch.float16, device=device)])
    pad_v = torch.cat([value, torch.randn(extra, 2, 32, dtype=torch.float16, device=device)])
    table = torch.full((9, batch.block_tables.shape[1]), 10**6, dtype=torch.int32)
    table[:3] = batch.block_tables.cpu()  # padding rows point nowhere: they must not be read
    got = launch_prefill(
        pad_q, *args, table.to(device), torch.from_numpy(padded.seq_lens).to(device),
        torch.from_numpy(padded.query_start_loc).to(device), 32**-0.5, None, SPLIT, pad_k, pad_v,
    )  # fmt: skip
    assert torch.equal(got[: sum(q_lens)], want)
    assert torch.isfinite(got[sum(q_lens) :]).all()  # the padding attends to its own keys
