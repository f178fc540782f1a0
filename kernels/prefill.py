"""Paged prefill / extend attention: chunks of new tokens over their cached prefix and themselves.

Serves chunked prefill, prefix-cache hits and decode tokens alike (a decode token is a chunk of
one), so a mixed batch is one launch. The queries of all sequences are packed ``[T, Hq, D]`` and
delimited by ``query_start_loc``. Keys split as in an extend kernel: the cached prefix is read
from the pages through the block table; the chunk's own keys are read from the contiguous
``key``/``value`` [T, Hkv, D] the engine just computed (and also wrote to the cache), by TMA,
when the caller passes them, else from the pages like the prefix.

One program owns ``BLOCK_Q`` consecutive query tokens of one sequence and one KV head, and
stacks the ``Hq / Hkv`` query heads of the group as extra rows (row = token * GROUP_PAD + head):
each K/V tile is loaded once for the whole group and the tensor-core tile is ``BLOCK_M`` rows
tall whatever the GQA ratio. Program ids map to (sequence, tile) without a host sync: sequence
b's tiles start at ``query_start_loc[b] // BLOCK_Q + b`` (increasing in b, never overlapping),
found by counting the first tiles <= the id; ids past a sequence's last tile exit at once.
Keys wholly before a tile's first query are visible to every row and run without masks; only
the diagonal band pays for the causal mask, and its first key step runs before the others.
Those unmasked keys run in three loops: whole prefix steps through the page table (cp.async,
32-bit offsets shared by K and V), a step that straddles the prefix's end by row pointers, and
the chunk's own keys by TMA tiles of the [T, Hkv * D] rows (no table, no per-row addresses, a
deeper pipeline). The softmax scale folds into the exponent's FMA. benchmarks/results/
kernels-notes.md has the measured effect of each choice. An FP8 cache's prefix is dequantized
as it loads (``kv_tiles``, ``fp8_rows``); the chunk's own keys stay in the model's type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from berth.kernels import checks
from berth.kernels.kv_tiles import fp8_rows, kv_rows, kv_tiles, row_descriptor, tma_rows

LOG2E = 1.4426950408889634
WIDE_INDEX_FROM = 2**31  # caches with element offsets this large index K/V in 64 bits


@dataclass(frozen=True)
class PrefillConfig:
    """Tile shape: ``block_m`` rows (query tokens x group heads) against ``block_n`` keys per
    step on the band and the chunk's own keys, ``paged_block_n`` (None: ``block_n``) per step
    through the page table; ``num_stages`` pipelines the paged loop, ``self_stages`` the TMA
    loop over the chunk's own keys."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3
    paged_block_n: int | None = None
    self_stages: int = 3


@triton.jit
def _find_sequence(query_start_loc_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):  # type: ignore[no-untyped-def]
    """The last sequence b whose first tile ``query_start_loc[b] // BLOCK_Q + b`` is <= tile.

    First tiles increase with b, so b is the count of those <= tile, minus one; counted 64
    sequences per vector load, one memory round trip for most batches instead of log2(B).
    """
    count = 0
    for base in range(0, num_seqs, 64):
        idx = base + tl.arange(0, 64)
        start = tl.load(query_start_loc_ptr + idx, mask=idx < num_seqs, other=2**30)
        count += tl.sum((start // BLOCK_Q + idx <= tile).to(tl.int32), axis=0)
    return count - 1


@triton.jit
def _online_softmax_step(q, k, v, m, l_i, acc, qk_scale, visible):  # type: ignore[no-untyped-def]
    """One key step of flash attention: scores, running max ``m`` (log2 units), sum ``l_i``
    and ``acc`` rescaled and updated. ``visible`` [M, N] or None (no mask)."""
    s = tl.dot(q, tl.trans(k))  # [M, N]; times qk_scale (> 0) gives log2 units
    if visible is not None:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _prefill_kernel(  # type: ignore[no-untyped-def]  # Triton kernel: pointer args
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    block_tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32, tokens in cache including the new ones
    query_start_loc_ptr,  # [B + 1] int32
    out_ptr,  # [T, Hq, D]
    key_ptr,  # [T, Hkv, D] the chunks' own keys (SELF_KV), heads packed (stride D)
    value_ptr,  # [T, Hkv, D]
    key_desc,  # TMA descriptor of key viewed as [T, Hkv * D], box [BLOCK_N, D] (SELF_KV)
    value_desc,  # the same for value
    k_scale_ptr,  # [num_blocks, block_size, Hkv] float32 (FP8 only)
    v_scale_ptr,
    qk_scale,  # softmax scale * log2(e)
    num_seqs,
    num_kv_heads,
    stride_q_t,
    stride_q_h,
    stride_k_block,
    stride_k_slot,
    stride_k_head,
    stride_v_block,
    stride_v_slot,
    stride_v_head,
    stride_key_t,
    stride_value_t,
    stride_bt_b,
    stride_out_t,
    stride_out_h,
    stride_ks_block,
    stride_ks_slot,
    stride_vs_block,
    stride_vs_slot,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,  # keys per step: the band and the chunk's own keys
    PAGED_N: tl.constexpr,  # keys per step through the page table (a multiple of BLOCK_N)
    SELF_STAGES: tl.constexpr,  # TMA pipeline depth of the chunk's own keys
    V_LIKE_K: tl.constexpr,  # v_cache has k_cache's strides: one offset tensor serves both
    WIDE_INDEX: tl.constexpr,  # an offset can pass 2**31: 64-bit offset arithmetic
    SELF_KV: tl.constexpr,  # the chunks' own K/V come from key/value, not the pages
    FP8: tl.constexpr,  # the cache is e4m3 with per-token, per-head scales
):
    # Heaviest tiles (the last ones of the last sequences) first, all KV heads of a tile
    # together, so the lightest programs form the tail (H100, 4 x 2k chunks, no prefix: +2-4%
    # over heads-outer order; within noise with a 2k prefix).
    rank = tl.num_programs(0) - 1 - tl.program_id(0)
    tile_id = rank // num_kv_heads
    kv_head = rank % num_kv_heads
    seq = _find_sequence(query_start_loc_ptr, tile_id, num_seqs, BLOCK_Q)
    q_begin = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    seq_len = tl.load(seq_lens_ptr + seq)
    q_first = (tile_id - (q_begin // BLOCK_Q + seq)) * BLOCK_Q  # first query of this tile
    if q_first >= q_len:
        return
    prefix = seq_len - q_len  # cached tokens before this chunk
    self_row0 = q_begin - prefix  # row of position p in key/value: self_row0 + p (p >= prefix)

    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    rows = tl.arange(0, BLOCK_M)
    q_idx = q_first + rows // GROUP_PAD  # query token within the chunk
    group_head = rows % GROUP_PAD
    row_ok = (q_idx < q_len) & (group_head < GROUP)
    q_pos = prefix + q_idx  # absolute position; sees keys <= q_pos
    dims = tl.arange(0, HEAD_DIM)
    token = (q_begin + q_idx).to(tl.int64)
    head = kv_head * GROUP + group_head
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt_b
    k_base = k_cache_ptr + kv_head * stride_k_head
    v_base = v_cache_ptr + kv_head * stride_v_head
    k_scale_base = k_scale_ptr + kv_head
    v_scale_base = v_scale_ptr + kv_head
    dtype = q_ptr.dtype.element_ty
    self_col = kv_head * HEAD_DIM  # this head's columns in key/value viewed as [T, Hkv * D]
    offsets = tl.arange(0, BLOCK_N)

    # The causal band [diag_start, band_end) needs a mask; keys before it are visible to every
    # row. Its first block goes first, as straight-line code: its K/V loads are in flight
    # together with Q's (one memory latency, not a second pipeline prologue after the main
    # loop), and every row sees its first key (diag_start <= q_pos), so the running max is
    # finite from here on and the loops below need no guard for rows that see nothing.
    diag_start = (prefix + q_first) // BLOCK_N * BLOCK_N
    band_end = tl.minimum(prefix + q_first + BLOCK_Q, seq_len)
    toks = diag_start + offsets
    tok_ok = toks < band_end
    k, v = kv_tiles(
        table, toks, tok_ok, prefix, self_row0, k_base, v_base, k_scale_base, v_scale_base,
        key_ptr, value_ptr, self_col, dims, stride_k_block, stride_k_slot, stride_v_block,
        stride_v_slot, stride_ks_block, stride_ks_slot, stride_vs_block, stride_vs_slot,
        stride_key_t, stride_value_t, BLOCK_SIZE, V_LIKE_K, WIDE_INDEX, SELF_KV, FP8,
    )  # fmt: skip
    k, v = k.to(dtype), v.to(dtype)  # FP8: dequantized in float32
    q = tl.load(
        q_ptr + token[:, None] * stride_q_t + head[:, None] * stride_q_h + dims[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )  # [M, D]
    s = tl.dot(q, tl.trans(k))
    s = tl.where((toks[None, :] <= q_pos[:, None]) & tok_ok[None, :], s, float("-inf"))
    m = tl.max(s, axis=1) * qk_scale
    p = tl.math.exp2(s * qk_scale - m[:, None])
    l_i = tl.sum(p, axis=1)
    acc = tl.dot(p.to(v.dtype), v)

    # Rest of the band: only when it spans more than one key block (BLOCK_Q > 1 step, or a
    # band that straddles a block edge).
    for tok0 in tl.range(diag_start + BLOCK_N, band_end, BLOCK_N, num_stages=1):
        toks = tok0 + offsets
        tok_ok = toks < band_end
        k, v = kv_tiles(
            table, toks, tok_ok, prefix, self_row0, k_base, v_base, k_scale_base, v_scale_base,
            key_ptr, value_ptr, self_col, dims, stride_k_block, stride_k_slot, stride_v_block,
            stride_v_slot, stride_ks_block, stride_ks_slot, stride_vs_block, stride_vs_slot,
            stride_key_t, stride_value_t, BLOCK_SIZE, V_LIKE_K, WIDE_INDEX, SELF_KV, FP8,
        )  # fmt: skip
        k, v = k.to(dtype), v.to(dtype)  # FP8: dequantized in float32
        visible = (toks[None, :] <= q_pos[:, None]) & tok_ok[None, :]
        m, l_i, acc = _online_softmax_step(q, k, v, m, l_i, acc, qk_scale, visible)

    # Keys before the band, no mask. Whole cached steps of PAGED_N keys through the page table;
    # then BLOCK_N steps by row pointers while a step still holds cached keys (the prefix's
    # end, or all of them without SELF_KV); then the chunk's own keys by TMA from the
    # contiguous key/value rows: no block table, no per-row addresses, SELF_STAGES deep.
    if SELF_KV:
        paged_end = tl.minimum(prefix, diag_start) // PAGED_N * PAGED_N
        self_start = tl.minimum(tl.cdiv(prefix, BLOCK_N) * BLOCK_N, diag_start)
    else:
        paged_end = diag_start // PAGED_N * PAGED_N
        self_start = diag_start
    paged_offsets = tl.arange(0, PAGED_N)
    for tok0 in range(0, paged_end, PAGED_N):
        k_rows, v_rows = kv_rows(
            table, tok0 + paged_offsets, None, k_base, v_base, stride_k_block, stride_k_slot,
            stride_v_block, stride_v_slot, BLOCK_SIZE, V_LIKE_K, WIDE_INDEX,
        )  # fmt: skip
        if FP8:  # (not ``toks``: a loop-carried name must keep its [BLOCK_N] shape)
            paged_toks = tok0 + paged_offsets
            k_wide = fp8_rows(k_rows, k_scale_base, table, paged_toks, None, dims,
                              stride_ks_block, stride_ks_slot, BLOCK_SIZE).to(dtype)  # fmt: skip
            v_wide = fp8_rows(v_rows, v_scale_base, table, paged_toks, None, dims,
                              stride_vs_block, stride_vs_slot, BLOCK_SIZE).to(dtype)  # fmt: skip
        else:
            k_wide = tl.load(k_rows[:, None] + dims[None, :])  # [PAGED_N, D]
            v_wide = tl.load(v_rows[:, None] + dims[None, :])
        m, l_i, acc = _online_softmax_step(q, k_wide, v_wide, m, l_i, acc, qk_scale, None)
    for tok0 in tl.range(paged_end, self_start, BLOCK_N, num_stages=1):
        toks = tok0 + offsets
        k, v = kv_tiles(
            table, toks, toks >= 0, prefix, self_row0, k_base, v_base, k_scale_base, v_scale_base,
            key_ptr, value_ptr, self_col, dims, stride_k_block, stride_k_slot, stride_v_block,
            stride_v_slot, stride_ks_block, stride_ks_slot, stride_vs_block, stride_vs_slot,
            stride_key_t, stride_value_t, BLOCK_SIZE, V_LIKE_K, WIDE_INDEX, SELF_KV, FP8,
        )  # fmt: skip
        k, v = k.to(dtype), v.to(dtype)  # FP8: dequantized in float32
        m, l_i, acc = _online_softmax_step(q, k, v, m, l_i, acc, qk_scale, None)
    if SELF_KV:
        for tok0 in tl.range(self_start, diag_start, BLOCK_N, num_stages=SELF_STAGES):
            k = key_desc.load([self_row0 + tok0, self_col])  # [BLOCK_N, D]
            v = value_desc.load([self_row0 + tok0, self_col])
            m, l_i, acc = _online_softmax_step(q, k, v, m, l_i, acc, qk_scale, None)

    out = acc * (1.0 / l_i)[:, None]
    dst = out_ptr + token[:, None] * stride_out_t + head[:, None] * stride_out_h + dims[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def _max_offset(t: torch.Tensor) -> int:
    """The largest element offset from ``t``'s first element (its view may be strided)."""
    return sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))


def default_config(head_dim: int, block_size: int) -> PrefillConfig:
    """At D <= 128: 128-row tiles, 8 warps, 64-key steps on the band and the chunk's own keys
    (3-deep TMA), 128-key steps through the page table (3-stage cp.async); the best of the
    H100 sweeps for 2k chunks (benchmarks/results/kernels-notes.md). At D = 256, half the
    rows and narrower steps to fit registers."""
    if head_dim > 128:
        narrow = max(32, block_size)
        return PrefillConfig(block_m=64, block_n=narrow, num_warps=8, num_stages=2, self_stages=2)
    paged = max(128, block_size)
    return PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3, paged_block_n=paged)


def launch_prefill(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor | None,
    config: PrefillConfig | None,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``paged_prefill_attention`` with an explicit tile config (the benchmark sweeps it)."""
    _, block_size, num_kv_heads, head_dim = checks.check_cache_pair(k_cache, v_cache)
    fp8 = checks.check_cache_scales(k_cache, k_scale, v_scale)
    checks.check_device(
        query=query,
        k_cache=k_cache,
        block_tables=block_tables,
        seq_lens=seq_lens,
        query_start_loc=query_start_loc,
    )
    checks.check_shape("query", query, (None, None, head_dim), "[num_tokens, num_heads, head_dim]")
    num_tokens, num_heads, _ = query.shape
    group = checks.check_attention_dims(num_heads, num_kv_heads, head_dim)
    checks.check_query_and_cache(query, k_cache)
    checks.check_unit_last_stride("query", query)
    checks.check_shape("seq_lens", seq_lens, (None,), "[num_seqs]")
    num_seqs = seq_lens.shape[0]
    checks.check_shape("block_tables", block_tables, (num_seqs, None), "[num_seqs, max_blocks]")
    checks.check_shape("query_start_loc", query_start_loc, (num_seqs + 1,), "[num_seqs + 1]")
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens)):
        checks.check_dtype(name, t, checks.INDEX_DTYPES)
    checks.check_dtype("query_start_loc", query_start_loc, checks.INDEX_DTYPES)
    checks.check_unit_last_stride("block_tables", block_tables)
    checks.check_contiguous("seq_lens", seq_lens)
    checks.check_contiguous("query_start_loc", query_start_loc)
    if (key is None) != (value is None):
        raise ValueError("key and value must be given together (or neither)")
    if key is not None and value is not None:
        kv_shape = (num_tokens, num_kv_heads, head_dim)
        for name, t in (("key", key), ("value", value)):
            checks.check_shape(name, t, kv_shape, "[num_tokens, num_kv_heads, head_dim]")
        checks.check_device(query=query, key=key, value=value)
        checks.check_same_dtype(query=query, key=key, value=value)
    if out is None:
        out = torch.empty_like(query)
    else:
        checks.check_out(out, query)
    if not scale > 0:
        raise ValueError(
            f"scale must be positive (the kernel folds it into max and exp), got {scale}"
        )
    if num_tokens == 0 or num_seqs == 0:
        return out
    config = config or default_config(head_dim, block_size)
    group_pad = triton.next_power_of_2(group)
    if config.block_m % group_pad:
        raise ValueError(f"block_m {config.block_m} must be a multiple of the group {group_pad}")
    paged_block_n = config.paged_block_n or config.block_n
    for name, n in (("block_n", config.block_n), ("paged_block_n", paged_block_n)):
        if n % block_size and block_size % n:
            raise ValueError(f"{name} {n} and block_size {block_size} must nest")
    if paged_block_n % config.block_n:
        raise ValueError(
            f"paged_block_n {paged_block_n} must be a multiple of block_n {config.block_n}"
        )
    block_q = config.block_m // group_pad
    num_tiles = num_tokens // block_q + num_seqs  # bounds sum_b cdiv(q_len_b, block_q)
    indexed = [k_cache, v_cache]
    key_desc = value_desc = None
    if key is not None and value is not None:
        key, value = tma_rows(key), tma_rows(value)
        key_desc, value_desc = (
            row_descriptor(key, config.block_n),
            row_descriptor(value, config.block_n),
        )
        indexed += [key, value]
    _prefill_kernel[(num_tiles * num_kv_heads,)](
        query,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        out,
        key,
        value,
        key_desc,
        value_desc,
        k_scale if fp8 else seq_lens,  # unused without FP8
        v_scale if fp8 else seq_lens,
        scale * LOG2E,
        num_seqs,
        num_kv_heads,
        query.stride(0),
        query.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        0 if key is None else key.stride(0),
        0 if value is None else value.stride(0),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        *checks.scale_strides(k_scale, v_scale),
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_Q=block_q,
        BLOCK_N=config.block_n,
        PAGED_N=paged_block_n,
        SELF_STAGES=config.self_stages,
        V_LIKE_K=k_cache.stride() == v_cache.stride(),
        WIDE_INDEX=max(_max_offset(t) for t in indexed) >= WIDE_INDEX_FROM,
        SELF_KV=key is not None,
        FP8=fp8,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def paged_prefill_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of packed new tokens [T, Hq, D] over their prefix and themselves.

    Query token i of sequence b sits at position ``seq_lens[b] - q_len_b + i``. The prefix
    (positions before ``seq_lens[b] - q_len_b``) is read from the cache. The new tokens' own
    K/V are read from ``key``/``value`` [T, Hkv, D] when given (no block table, TMA), else from
    the cache, where they must already be. No host sync: mixed prefill/decode batches are one
    launch. An FP8 cache comes with its scales (``write_kv_cache``).
    """
    return launch_prefill(
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out, None,
        key, value, k_scale, v_scale,
    )  # fmt: skip
