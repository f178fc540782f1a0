"""Where the prefill kernel's K/V tiles come from: the pages, or the chunk's own key/value.

The cached prefix is gathered row by row through the block table (``kv_rows``); the chunk's own
keys, which the engine hands over as contiguous ``key``/``value`` [T, Hkv, D], are read by TMA
through a descriptor of their [T, Hkv * D] rows (``row_descriptor``), whole tiles at a time. A
step that straddles the prefix's end takes each row from its own source (``kv_tiles``). An
FP8 cache's rows are dequantized as they load (``fp8_rows``: e4m3 x the token's per-head scale);
the chunk's own keys are never quantized.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def kv_rows(  # type: ignore[no-untyped-def]
    table,
    toks,
    tok_ok,
    k_base,
    v_base,
    stride_k_block,
    stride_k_slot,
    stride_v_block,
    stride_v_slot,
    BLOCK_SIZE: tl.constexpr,
    V_LIKE_K: tl.constexpr,
    WIDE_INDEX: tl.constexpr,
):
    """Pointers to the K and V rows [N] of positions ``toks`` in the pages, via the block table.

    Index arithmetic is about a seventh of the paged key loop's instructions on H100 (SASS
    count), so it stays 32-bit unless the cache needs more, and is shared by K and V when they
    can. ``tok_ok`` None means every position is valid (no mask on the table load).
    """
    if tok_ok is None:
        block = tl.load(table + toks // BLOCK_SIZE)
    else:
        block = tl.load(table + toks // BLOCK_SIZE, mask=tok_ok, other=0)
    if WIDE_INDEX:
        block = block.to(tl.int64)
    slot = toks % BLOCK_SIZE
    k_off = block * stride_k_block + slot * stride_k_slot
    v_off = k_off if V_LIKE_K else block * stride_v_block + slot * stride_v_slot
    return k_base + k_off, v_base + v_off


@triton.jit
def fp8_rows(  # type: ignore[no-untyped-def]
    rows,
    scale_base,
    table,
    toks,
    ok,
    dims,
    stride_s_block,
    stride_s_slot,
    BLOCK_SIZE: tl.constexpr,
):
    """FP8 cache rows [N, D] at row pointers ``rows``, dequantized to float32 with the scales
    of positions ``toks`` (``scale_base`` already offset to the KV head); zero where not ``ok``
    (None: all valid)."""
    if ok is None:
        block = tl.load(table + toks // BLOCK_SIZE)
        scale = tl.load(scale_base + block * stride_s_block + (toks % BLOCK_SIZE) * stride_s_slot)
        x = tl.load(rows[:, None] + dims[None, :])
    else:
        block = tl.load(table + toks // BLOCK_SIZE, mask=ok, other=0)
        where = block * stride_s_block + (toks % BLOCK_SIZE) * stride_s_slot
        scale = tl.load(scale_base + where, mask=ok, other=0.0)
        x = tl.load(rows[:, None] + dims[None, :], mask=ok[:, None], other=0.0)
    return x.to(tl.float32) * scale[:, None]


@triton.jit
def kv_tiles(  # type: ignore[no-untyped-def]
    table,
    toks,
    tok_ok,
    prefix,
    self_row0,
    k_base,
    v_base,
    k_scale_base,
    v_scale_base,
    key_ptr,
    value_ptr,
    self_col,
    dims,
    stride_k_block,
    stride_k_slot,
    stride_v_block,
    stride_v_slot,
    stride_ks_block,
    stride_ks_slot,
    stride_vs_block,
    stride_vs_slot,
    stride_key_t,
    stride_value_t,
    BLOCK_SIZE: tl.constexpr,
    V_LIKE_K: tl.constexpr,
    WIDE_INDEX: tl.constexpr,
    SELF_KV: tl.constexpr,
    FP8: tl.constexpr,
):
    """K and V tiles [N, D] of positions ``toks`` (zero where not ``tok_ok``) for a step that
    may straddle the prefix's end: cached positions from the pages, with SELF_KV the chunk's own
    from ``key``/``value`` rows ``self_row0 + toks``, columns from ``self_col`` (one load
    each: row pointers are selected, not tiles). Over an FP8 cache (``k_scale_base`` and
    ``v_scale_base`` offset to the KV head) the tiles are float32: cached rows dequantized, the
    chunk's own loaded apart and selected by value (the sources differ in type)."""
    if FP8:
        cached = tok_ok & (toks < prefix) if SELF_KV else tok_ok
        k_rows, v_rows = kv_rows(
            table, toks, cached, k_base, v_base, stride_k_block, stride_k_slot,
            stride_v_block, stride_v_slot, BLOCK_SIZE, V_LIKE_K, WIDE_INDEX,
        )  # fmt: skip
        k = fp8_rows(k_rows, k_scale_base, table, toks, cached, dims, stride_ks_block,
                     stride_ks_slot, BLOCK_SIZE)  # fmt: skip
        v = fp8_rows(v_rows, v_scale_base, table, toks, cached, dims, stride_vs_block,
                     stride_vs_slot, BLOCK_SIZE)  # fmt: skip
        if SELF_KV:
            own = tok_ok & (toks >= prefix)
            rows = self_row0 + toks
            if WIDE_INDEX:
                rows = rows.to(tl.int64)
            k_own = tl.load(
                key_ptr + self_col + rows[:, None] * stride_key_t + dims[None, :],
                mask=own[:, None],
                other=0.0,
            )
            v_own = tl.load(
                value_ptr + self_col + rows[:, None] * stride_value_t + dims[None, :],
                mask=own[:, None],
                other=0.0,
            )
            k = tl.where(own[:, None], k_own.to(tl.float32), k)
            v = tl.where(own[:, None], v_own.to(tl.float32), v)
    else:
        if SELF_KV:
            cached = toks < prefix
            k_rows, v_rows = kv_rows(
                table, toks, tok_ok & cached, k_base, v_base, stride_k_block, stride_k_slot,
                stride_v_block, stride_v_slot, BLOCK_SIZE, V_LIKE_K, WIDE_INDEX,
            )  # fmt: skip
            rows = self_row0 + toks
            if WIDE_INDEX:
                rows = rows.to(tl.int64)
            k_rows = tl.where(cached, k_rows, key_ptr + self_col + rows * stride_key_t)
            v_rows = tl.where(cached, v_rows, value_ptr + self_col + rows * stride_value_t)
        else:
            k_rows, v_rows = kv_rows(
                table, toks, tok_ok, k_base, v_base, stride_k_block, stride_k_slot,
                stride_v_block, stride_v_slot, BLOCK_SIZE, V_LIKE_K, WIDE_INDEX,
            )  # fmt: skip
        k = tl.load(k_rows[:, None] + dims[None, :], mask=tok_ok[:, None], other=0.0)
        v = tl.load(v_rows[:, None] + dims[None, :], mask=tok_ok[:, None], other=0.0)
    return k, v


def tma_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` [T, Hkv, D] if TMA can read it as a [T, Hkv * D] matrix (heads packed, 16-byte
    aligned base and rows), else a packed copy. The engine's K (fresh from RoPE) and V (a view
    of the fused QKV projection) both qualify as they are."""
    row_bytes = t.stride(0) * t.element_size()
    packed = t.stride(2) == 1 and (t.shape[1] == 1 or t.stride(1) == t.shape[2])
    if packed and t.data_ptr() % 16 == 0 and row_bytes % 16 == 0:
        return t
    return t.contiguous() if not t.is_contiguous() else t.clone()


def row_descriptor(t: torch.Tensor, block_n: int) -> TensorDescriptor:
    """TMA descriptor of ``t`` [T, Hkv, D] seen as [T, Hkv * D], one box = ``block_n`` rows of
    one head."""
    num_tokens, num_kv_heads, head_dim = t.shape
    return TensorDescriptor(
        base=t,
        shape=[num_tokens, num_kv_heads * head_dim],
        strides=[t.stride(0), 1],
        block_shape=[block_n, head_dim],
    )
