"""KV cache write: scatter each new token's keys and values into its slot of the paged cache.

One program per token copies that token's ``[Hkv, D]`` keys and values (contiguous in the
token-major page layout) to slot ``slot_mapping[t]``; a negative slot marks padding and is
skipped, so a CUDA graph captured for a padded batch writes only the real tokens.

An FP8 (e4m3) cache quantizes on the way in, with one float32 scale per token and KV head
(``k_scale``/``v_scale`` [num_blocks, block_size, Hkv]): the head's largest magnitude maps to
e4m3's largest finite value, 448, so nothing saturates and each head keeps its own range.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from berth.kernels import checks, reference

# The reference's quantization rule, as constants the kernel can read.
FP8_MAX: tl.constexpr = tl.constexpr(reference.FP8_MAX)
FP8_TINY: tl.constexpr = tl.constexpr(reference.FP8_TINY)


@triton.jit
def _write_kv_cache_kernel(  # type: ignore[no-untyped-def]  # Triton kernel: pointer args
    key_ptr,  # [T, Hkv, D]
    value_ptr,  # [T, Hkv, D]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    slot_mapping_ptr,  # [T] int64
    k_scale_ptr,  # [num_blocks, block_size, Hkv] float32 (FP8 only)
    v_scale_ptr,
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
    stride_ks_block,
    stride_ks_slot,
    stride_vs_block,
    stride_vs_slot,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    DIM_PAD: tl.constexpr,
    FP8: tl.constexpr,
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
    k = tl.load(src_k, mask=mask, other=0.0)
    v = tl.load(src_v, mask=mask, other=0.0)
    if FP8:
        k, k_scale = _quantize(k.to(tl.float32))
        v, v_scale = _quantize(v.to(tl.float32))
        head_ok = tl.arange(0, HEADS_PAD) < NUM_KV_HEADS
        k_scale_dst = k_scale_ptr + block * stride_ks_block + offset * stride_ks_slot
        v_scale_dst = v_scale_ptr + block * stride_vs_block + offset * stride_vs_slot
        tl.store(k_scale_dst + tl.arange(0, HEADS_PAD), k_scale, mask=head_ok)
        tl.store(v_scale_dst + tl.arange(0, HEADS_PAD), v_scale, mask=head_ok)
    tl.store(dst_k + heads * stride_kc_head + dims, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst_v + heads * stride_vc_head + dims, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quantize(x):  # type: ignore[no-untyped-def]
    """x [H, D] float32 -> (x / scale rounded to e4m3's values, scale [H]): amax maps to 448."""
    scale = fp8_scale(tl.max(tl.abs(x), axis=1))
    return to_e4m3(x, scale), scale


@triton.jit
def fp8_scale(amax):  # type: ignore[no-untyped-def]
    """Each head's scale [H] from its largest magnitude: it maps to 448, so nothing saturates."""
    return tl.maximum(amax, FP8_TINY) / FP8_MAX


@triton.jit
def to_e4m3(x, scale):  # type: ignore[no-untyped-def]
    """x [H, n] float32 over its heads' ``scale`` [H], rounded to e4m3's values (still float32)."""
    x = x / scale[:, None]
    return _round_to_e4m3(tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX))


@triton.jit
def _round_to_e4m3(x):  # type: ignore[no-untyped-def]
    """float32 |x| <= 448 rounded to the nearest e4m3 value (ties to even), still float32, so
    that the cast to e4m3 is exact: Triton's CPU interpreter rounds the cast wrongly where a
    value rounds up to a power of two (-127.9 became -64), the GPU's cvt does it right.
    Normal range: round the mantissa to 3 bits on the bits; below 2^-6 the values are
    multiples of 2^-9, rounded by adding and taking away 1.5 * 2^14."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # keep sign, exponent, 3 bits
    normal = bits.to(tl.float32, bitcast=True)
    subnormal = (x + 24576.0) - 24576.0
    return tl.where(tl.abs(x) < 0.015625, subnormal, normal)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write key/value [T, Hkv, D] into the caches at ``slot_mapping`` [T] (int64; < 0 skips);
    an FP8 cache also gets each token's per-head scales in ``k_scale``/``v_scale``.

    Slots must lie below ``num_blocks * block_size`` (not checked: that would need a sync).
    """
    _, block_size, num_kv_heads, head_dim = checks.check_cache_pair(k_cache, v_cache)
    fp8 = checks.check_cache_scales(k_cache, k_scale, v_scale)
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
        k_scale if fp8 else slot_mapping,  # unused without FP8
        v_scale if fp8 else slot_mapping,
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
        *checks.scale_strides(k_scale, v_scale),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        DIM_PAD=triton.next_power_of_2(head_dim),
        FP8=fp8,
        num_warps=4,
    )
