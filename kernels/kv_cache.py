"""KV cache write: scatter each new token's keys and values into its slot of the paged cache.

One program per token copies that token's ``[Hkv, D]`` keys and values (contiguous in the
token-major page layout) to slot ``slot_mapping[t]``; a negative slot marks padding and is
skipped, so a CUDA graph captured for a padded batch writes only the real tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from berth.kernels import checks


@triton.jit
def _write_kv_cache_kernel(  # type: ignore[no-untyped-def]  # Triton kernel: pointer args
    key_ptr,  # [T, Hkv, D]
    value_ptr,  # [T, Hkv, D]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    slot_mapping_ptr,  # [T] int64
    stride_key_t,
    stride_key_h,
    stride_value_t,
    stride_value_h,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    DIM_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, DIM_PAD)[None, :]
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
    src_k = key_ptr + token.to(tl.int64) * stride_key_t + heads * stride_key_h + dims
    src_v = value_ptr + token.to(tl.int64) * stride_value_t + heads * stride_value_h + dims
    dst_k = k_cache_ptr + block * stride_kc_block + offset * stride_kc_slot
    dst_v = v_cache_ptr + block * stride_vc_block + offset * stride_vc_slot
    k = tl.load(src_k, mask=mask)
    v = tl.load(src_v, mask=mask)
    tl.store(dst_k + heads * stride_kc_head + dims, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst_v + heads * stride_vc_head + dims, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value [T, Hkv, D] into the caches at ``slot_mapping`` [T] (int64; < 0 skips).

    Slots must lie below ``num_blocks * block_size`` (not checked: that would need a sync).
    """
    _, block_size, num_kv_heads, head_dim = checks.check_cache_pair(k_cache, v_cache)
    checks.check_device(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot=slot_mapping)
    what = "[num_tokens, num_kv_heads, head_dim]"
    checks.check_shape("key", key, (None, num_kv_heads, head_dim), what)
    checks.check_shape("value", value, (key.shape[0], num_kv_heads, head_dim), what)
    checks.check_shape("slot_mapping", slot_mapping, (key.shape[0],), "[num_tokens]")
    checks.check_dtype("slot_mapping", slot_mapping, (torch.int64,))
    checks.check_dtype("key", key, checks.ATTENTION_DTYPES)
    checks.check_same_dtype(key=key, value=value)
    checks.check_unit_last_stride("key", key)
    checks.check_unit_last_stride("value", value)
    checks.check_contiguous("slot_mapping", slot_mapping)
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    _write_kv_cache_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        DIM_PAD=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
