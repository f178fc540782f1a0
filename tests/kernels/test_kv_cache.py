"""KV cache write: the Triton scatter against the reference, padding slots skipped."""

from __future__ import annotations

import pytest
import torch
from paged_checks import CPU_DTYPES, GPU_DTYPES

from berth.kernels import reference, write_kv_cache


def run_write(
    num_tokens: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> None:
    num_blocks, block_size = 2 * num_tokens // 16 + 2, 16
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=dtype, device=device)
    v_cache = torch.randn(shape, dtype=dtype, device=device)
    slots = torch.randperm(num_blocks * block_size)[:num_tokens].to(device)
    slots[::5] = -1  # padding tokens
    key = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    reference.write_kv_cache(key, value, k_expected, v_expected, slots)
    write_kv_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_expected)
    assert torch.equal(v_cache, v_expected)
    assert not torch.equal(k_cache, k_expected.roll(1, 0))  # the write changed something


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize(("heads", "head_dim"), [(2, 32), (3, 48)])
def test_write_kv_cache_matches_reference(
    device: torch.device, dtype: torch.dtype, heads: int, head_dim: int
) -> None:
    run_write(20, heads, head_dim, dtype, device)


def test_write_kv_cache_into_strided_layer_view(device: torch.device) -> None:
    """A layer sliced out of one [layers, 2, ...] allocation writes through its strides."""
    pool = torch.randn(3, 2, 6, 16, 2, 32, dtype=torch.float16, device=device)
    k_cache, v_cache = pool[1, 0], pool[1, 1]
    before = pool.clone()
    key = torch.randn(4, 2, 32, dtype=torch.float16, device=device)
    value = torch.randn(4, 2, 32, dtype=torch.float16, device=device)
    slots = torch.tensor([0, 17, -1, 95], device=device)
    write_kv_cache(key, value, k_cache, v_cache, slots)
    flat_k = k_cache.reshape(-1, 2, 32)
    assert torch.equal(flat_k[17], key[1]) and torch.equal(flat_k[95], key[3])
    assert torch.equal(v_cache.reshape(-1, 2, 32)[0], value[0])
    assert torch.equal(pool[0], before[0]) and torch.equal(pool[2], before[2])


def test_write_kv_cache_rejects_bad_inputs(device: torch.device) -> None:
    cache = torch.zeros(2, 16, 2, 32, dtype=torch.float16, device=device)
    key = torch.randn(3, 2, 32, dtype=torch.float16, device=device)
    slots = torch.arange(3, device=device)
    with pytest.raises(TypeError, match="slot_mapping"):
        write_kv_cache(key, key, cache, cache.clone(), slots.int())
    with pytest.raises(ValueError, match="key must be"):
        write_kv_cache(key[:, :1], key[:, :1], cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="v_cache"):
        write_kv_cache(key, key, cache, cache[:1].clone(), slots)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_write_kv_cache_full_shapes_on_gpu(device: torch.device, dtype: torch.dtype) -> None:
    run_write(8192, 8, 128, dtype, device)


def test_write_kv_cache_reads_keys_split_from_a_fused_projection(device: torch.device) -> None:
    """The engine passes K and V as views into one fused QKV output (row stride > Hkv * D)."""
    qkv = torch.randn(5, (4 + 2 + 2) * 16, dtype=torch.float16, device=device)
    _, k, v = qkv.split([64, 32, 32], dim=-1)
    key, value = k.reshape(5, 2, 16), v.reshape(5, 2, 16)
    assert not key.is_contiguous()
    k_cache = torch.zeros(2, 16, 2, 16, dtype=torch.float16, device=device)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([3, 4, 30, -1, 0], device=device)
    write_kv_cache(key, value, k_cache, v_cache, slots)
    k_expected, v_expected = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    reference.write_kv_cache(key, value, k_expected, v_expected, slots)
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)
