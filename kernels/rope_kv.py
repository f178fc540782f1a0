"""RoPE and the KV cache write in one kernel: rotate each new token's query and key heads in
place, then store its key and value in its cache slot.

Unfused, a layer runs three kernels here (the compiled RoPE is two: one for the queries, one for
the keys; then ``write_kv_cache``), 6.7 us a layer at batch 256 on the H200 and 96 of a decode
graph's ~390 nodes. One program per token does all of it: the token's heads are loaded once,
rotated in float32 and rounded once to the model's dtype (as the compiled RoPE does), written
back where the projection put them (the attention kernels read them there), and the key and
value go on to slot ``slot_mapping[t]`` (a negative slot is padding: rotated, not stored). Qwen3's
per-head RMSNorm of q and k runs first when its weights are given; an FP8 cache quantizes on
the way in, by ``write_kv_cache``'s rule.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from berth.kernels import checks
from berth.kernels.kv_cache import fp8_scale, to_e4m3


@triton.jit
def _norm_rotate(  # type: ignore[no-untyped-def]
    x_ptr, norm_ptr, eps, cos1, cos2, sin1, sin2, heads, half, mask,
    HEAD_DIM: tl.constexpr, QK_NORM: tl.constexpr,
):  # fmt: skip
    """Load heads [H, D] of one token from ``x_ptr`` as two halves, normalize (Qwen3), rotate,
    store them back where they were; returns the rotated halves, in the input's dtype."""
    HALF: tl.constexpr = HEAD_DIM // 2
    first = x_ptr + heads + half
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    if QK_NORM:
        # Hugging Face's RMSNorm: statistics in float32, the scale applied in the model's dtype.
        rstd = tl.rsqrt((tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) / HEAD_DIM + eps)
        w1 = tl.load(norm_ptr + half, mask=half < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(norm_ptr + HALF + half, mask=half < HALF, other=0.0).to(tl.float32)
        a = ((a * rstd[:, None]).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        b = ((b * rstd[:, None]).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
    out1 = (a * cos1 - b * sin1).to(dtype)
    out2 = (b * cos2 + a * sin2).to(dtype)
    tl.store(first, out1, mask=mask)
    tl.store(first + HALF, out2, mask=mask)
    return out1, out2


@triton.jit
def _store_kv(  # type: ignore[no-untyped-def]
    cache_ptr, scale_ptr, x1, x2, heads_row, half, mask, head_ok,
    HEAD_DIM: tl.constexpr, HEADS_PAD: tl.constexpr, FP8: tl.constexpr,
):  # fmt: skip
    """Store one token's [Hkv, D] halves at ``cache_ptr`` (its slot); an FP8 cache gets them
    quantized by ``write_kv_cache``'s rule (each head's amax maps to 448) and the scales."""
    HALF: tl.constexpr = HEAD_DIM // 2
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    if FP8:
        scale = fp8_scale(tl.maximum(tl.max(tl.abs(a), axis=1), tl.max(tl.abs(b), axis=1)))
        a = to_e4m3(a, scale)
        b = to_e4m3(b, scale)
        tl.store(scale_ptr + tl.arange(0, HEADS_PAD), scale, mask=head_ok)
    tl.store(cache_ptr + heads_row + half, a.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(cache_ptr + heads_row + HALF + half, b.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_write_kv_kernel(  # type: ignore[no-untyped-def]  # Triton kernel: pointer args
    q_ptr,  # [T, Hq, D], rotated in place
    k_ptr,  # [T, Hkv, D], rotated in place
    v_ptr,  # [T, Hkv, D]
    cos_ptr,  # [T, D]
    sin_ptr,  # [T, D]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,
    slot_mapping_ptr,  # [T] int64
    k_scale_ptr,  # [num_blocks, block_size, Hkv] float32 (FP8 only)
    v_scale_ptr,
    q_norm_ptr,  # [D] (QK_NORM only)
    k_norm_ptr,
    eps,
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    stride_cos_t,
    stride_sin_t,
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
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
    FP8: tl.constexpr,
    QK_NORM: tl.constexpr,
    PDL: tl.constexpr = False,
):
    if PDL:  # q, k, v are the projection's output, the kernel before's
        gdc_wait()
        gdc_launch_dependents()  # the attention kernel may start loading its programs
    HALF: tl.constexpr = HEAD_DIM // 2
    token = tl.program_id(0).to(tl.int64)
    half = tl.arange(0, HALF_PAD)[None, :]
    in_half = half < HALF
    cos_row = cos_ptr + token * stride_cos_t + half
    sin_row = sin_ptr + token * stride_sin_t + half
    cos1 = tl.load(cos_row, mask=in_half, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_row + HALF, mask=in_half, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_row, mask=in_half, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_row + HALF, mask=in_half, other=0.0).to(tl.float32)

    q_heads = tl.arange(0, Q_HEADS_PAD)[:, None]
    _norm_rotate(
        q_ptr + token * stride_q_t, q_norm_ptr, eps, cos1, cos2, sin1, sin2,
        q_heads * stride_q_h, half, (q_heads < NUM_HEADS) & in_half, HEAD_DIM, QK_NORM,
    )  # fmt: skip
    kv_heads = tl.arange(0, KV_HEADS_PAD)[:, None]
    kv_mask = (kv_heads < NUM_KV_HEADS) & in_half
    k1, k2 = _norm_rotate(
        k_ptr + token * stride_k_t, k_norm_ptr, eps, cos1, cos2, sin1, sin2,
        kv_heads * stride_k_h, half, kv_mask, HEAD_DIM, QK_NORM,
    )  # fmt: skip

    slot = tl.load(slot_mapping_ptr + token)
    if slot >= 0:
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        v_row = v_ptr + token * stride_v_t + kv_heads * stride_v_h + half
        v1 = tl.load(v_row, mask=kv_mask, other=0.0)
        v2 = tl.load(v_row + HALF, mask=kv_mask, other=0.0)
        head_ok = tl.arange(0, KV_HEADS_PAD) < NUM_KV_HEADS
        _store_kv(
            k_cache_ptr + block * stride_kc_block + offset * stride_kc_slot,
            k_scale_ptr + block * stride_ks_block + offset * stride_ks_slot,
            k1, k2, kv_heads * stride_kc_head, half, kv_mask, head_ok,
            HEAD_DIM, KV_HEADS_PAD, FP8,
        )  # fmt: skip
        _store_kv(
            v_cache_ptr + block * stride_vc_block + offset * stride_vc_slot,
            v_scale_ptr + block * stride_vs_block + offset * stride_vs_slot,
            v1, v2, kv_heads * stride_vc_head, half, kv_mask, head_ok,
            HEAD_DIM, KV_HEADS_PAD, FP8,
        )  # fmt: skip


def rope_write_kv_cache(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> None:
    """Rotate ``query`` [T, Hq, D] and ``key`` [T, Hkv, D] in place by ``cos``/``sin`` [T, D]
    (after a per-head RMSNorm with ``q_norm``/``k_norm`` [D] when given), then write ``key``
    and ``value`` into the caches at ``slot_mapping`` [T] (int64; < 0 skips), with an FP8
    cache's per-head scales in ``k_scale``/``v_scale``. ``reference.rope_write_kv_cache`` is
    the specification. Query and key may be views into one fused projection's output.
    """
    _, block_size, num_kv_heads, head_dim = checks.check_cache_pair(k_cache, v_cache)
    fp8 = checks.check_cache_scales(k_cache, k_scale, v_scale)
    checks.check_device(
        query=query, key=key, value=value, cos=cos, sin=sin, k_cache=k_cache, slot=slot_mapping
    )
    num_tokens = key.shape[0]
    kv = "[num_tokens, num_kv_heads, head_dim]"
    checks.check_shape(
        "query", query, (num_tokens, None, head_dim), "[num_tokens, heads, head_dim]"
    )
    checks.check_shape("key", key, (None, num_kv_heads, head_dim), kv)
    checks.check_shape("value", value, (num_tokens, num_kv_heads, head_dim), kv)
    for name, t in (("cos", cos), ("sin", sin)):
        checks.check_shape(name, t, (num_tokens, head_dim), "[num_tokens, head_dim]")
        checks.check_unit_last_stride(name, t)
    checks.check_shape("slot_mapping", slot_mapping, (num_tokens,), "[num_tokens]")
    checks.check_dtype("slot_mapping", slot_mapping, (torch.int64,))
    checks.check_dtype("query", query, checks.ATTENTION_DTYPES)
    checks.check_same_dtype(query=query, key=key, value=value)
    for name, t in (("query", query), ("key", key), ("value", value)):
        checks.check_unit_last_stride(name, t)
    checks.check_contiguous("slot_mapping", slot_mapping)
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm and k_norm must be given together (or neither)")
    if q_norm is not None and k_norm is not None:
        for name, t in (("q_norm", q_norm), ("k_norm", k_norm)):
            checks.check_shape(name, t, (head_dim,), "[head_dim]")
            checks.check_contiguous(name, t)
    if num_tokens == 0:
        return
    _rope_write_kv_kernel[(num_tokens,)](
        query,
        key,
        value,
        cos,
        sin,
        k_cache,
        v_cache,
        slot_mapping,
        k_scale if fp8 else slot_mapping,  # unused without FP8
        v_scale if fp8 else slot_mapping,
        q_norm if q_norm is not None else cos,  # unused without QK norm
        k_norm if k_norm is not None else cos,
        eps,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        cos.stride(0),
        sin.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        *checks.scale_strides(k_scale, v_scale),
        NUM_HEADS=query.shape[1],
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        Q_HEADS_PAD=triton.next_power_of_2(query.shape[1]),
        KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HALF_PAD=triton.next_power_of_2(head_dim // 2),
        FP8=fp8,
        QK_NORM=q_norm is not None,
        num_warps=4,
        **checks.launch_options(query.device),
    )
