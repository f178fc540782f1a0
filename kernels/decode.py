"""Paged decode attention (flash-decoding): one new query token per sequence.

Decode is memory-bound: each KV byte is used once per query group, so the kernel's job is to
stream the pages at HBM speed. One program owns (sequence, KV head, split): it loads each page
row of that KV head once and applies it to all ``Hq / Hkv`` query heads of the group with one
tensor-core dot (the group padded to 16 rows). A batch too small to fill the GPU has its KV
sequence split into ``num_splits`` pieces; each writes its partial output, normalised, and its
log-sum-exp, and a second kernel merges them. The split count depends only on shapes and the
caller's ``max_seq_len`` so the launch can be captured in a CUDA graph.

An FP8 cache is read as it is stored (half the bytes of bf16) and dequantized in registers: a
key's per-head scale multiplies its column of scores, a value's scales its column of
probabilities before the PV product, so the tensor-core dots see the raw e4m3 values converted
to fp16. It is read as 16-bit words, two values each, split into the even and the odd head
dimensions: read as bytes, the keys' transposed dot operand was gathered from shared memory a
byte at a time (``benchmarks/kernel_sass.py`` counts the instructions).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from berth.kernels import checks

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeConfig:
    """Launch shape: tokens per loop step, when and how far to split, Triton's knobs."""

    block_n: int = 128
    no_split_waves: float = 3.0  # a grid of this many programs per SM is left unsplit
    # A batch of at most this many programs per SM is split into one round of them (rounded
    # down): about as many as run at once, so no short last round reads HBM half idle (H100
    # sweep, kernels-notes.md: 1 x 32k 55.6 -> 51.6 us at 256 programs; 8 x 32k at 320
    # programs, a round and a fifth, 427 us against 350).
    split_waves: float = 2.0
    # A larger batch (still below no_split_waves) is split finely to this many per SM instead,
    # so that its last round, whatever it holds, is short (the plan measured before, v2).
    tail_split_waves: float = 8.0
    min_split_tokens: int = 128  # below this, the merge costs more than the split buys
    num_warps: int = 4
    num_stages: int = 3
    # An FP8 cache read as 16-bit words (head_dim >= 32); False reads it byte by byte, the
    # fallback for odd strides and small heads (H100: 1.43x -> 1.71x the bf16 cache at 8 x 32k
    # for words; kernels.py times both).
    fp8_words: bool = True


@triton.jit
def _token_scales(  # type: ignore[no-untyped-def]
    k_scale_ptr, v_scale_ptr, block, slot, kv_head, tok_ok,
    stride_ks_block, stride_ks_slot, stride_vs_block, stride_vs_slot,
):  # fmt: skip
    """An FP8 cache's per-token scales of one KV head, [N] each for K and V."""
    k_scale = tl.load(
        k_scale_ptr + block * stride_ks_block + slot * stride_ks_slot + kv_head,
        mask=tok_ok,
        other=0.0,
    )
    v_scale = tl.load(
        v_scale_ptr + block * stride_vs_block + slot * stride_vs_slot + kv_head,
        mask=tok_ok,
        other=0.0,
    )
    return k_scale, v_scale


@triton.jit
def _softmax_step(s, m, l):  # type: ignore[no-untyped-def]  # noqa: E741
    """Online softmax over one tile of scores s [G, N] (log2 units): the probabilities, the
    factor that rescales what was accumulated, the new running max and sum."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m - m_new)
    return p, alpha, m_new, l * alpha + tl.sum(p, axis=1)


@triton.jit
def _log_sum_exp(m, l):  # type: ignore[no-untyped-def]  # noqa: E741
    """A split's log2-sum-exp for the merge; -inf for an empty split."""
    return tl.where(l > 0, m + tl.math.log2(tl.maximum(l, 1e-30)), float("-inf"))


@triton.jit
def _decode_kernel(  # type: ignore[no-untyped-def]  # Triton kernel: pointer args
    q_ptr,  # [B, Hq, D]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    block_tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32
    out_ptr,  # [B, Hq, D]; written when SINGLE_SPLIT
    part_out_ptr,  # [B, Hq, num_splits, D] float32; written otherwise
    part_lse_ptr,  # [B, Hq, num_splits] float32 (log2 domain)
    k_scale_ptr,  # [num_blocks, block_size, Hkv] float32 (FP8 only)
    v_scale_ptr,
    qk_scale,  # softmax scale * log2(e)
    stride_q_b,
    stride_q_h,
    stride_k_block,
    stride_k_slot,
    stride_k_head,
    stride_v_block,
    stride_v_slot,
    stride_v_head,
    stride_bt_b,
    stride_out_b,
    stride_out_h,
    stride_ks_block,
    stride_ks_slot,
    stride_vs_block,
    stride_vs_slot,
    num_splits,
    split_tokens,  # tokens per split, a multiple of BLOCK_N
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    FP8: tl.constexpr,
    PDL: tl.constexpr = False,
):
    if PDL:  # the query is the kernel before's output
        gdc_wait()
        gdc_launch_dependents()
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = split * split_tokens
    end = tl.minimum(start + split_tokens, seq_len)

    rows = tl.arange(0, GROUP_PAD)  # query heads of this group
    row_ok = rows < GROUP
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + seq * stride_q_b + heads[:, None] * stride_q_h + dims[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )  # [G, D]

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)  # noqa: E741
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt_b
    k_base = k_cache_ptr + kv_head * stride_k_head
    v_base = v_cache_ptr + kv_head * stride_v_head
    for tok0 in range(start, end, BLOCK_N):
        toks = tok0 + tl.arange(0, BLOCK_N)
        tok_ok = toks < end
        block = tl.load(table + toks // BLOCK_SIZE, mask=tok_ok, other=0).to(tl.int64)
        slot = toks % BLOCK_SIZE
        k = tl.load(
            k_base + (block * stride_k_block + slot * stride_k_slot)[:, None] + dims[None, :],
            mask=tok_ok[:, None],
            other=0.0,
        )  # [N, D]
        v = tl.load(
            v_base + (block * stride_v_block + slot * stride_v_slot)[:, None] + dims[None, :],
            mask=tok_ok[:, None],
            other=0.0,
        )  # [N, D]
        if FP8:
            k_scale, v_scale = _token_scales(
                k_scale_ptr, v_scale_ptr, block, slot, kv_head, tok_ok,
                stride_ks_block, stride_ks_slot, stride_vs_block, stride_vs_slot,
            )  # fmt: skip
            # e4m3 -> fp16 is one conversion instruction (to bf16 it goes through fp32).
            s = tl.dot(q.to(tl.float16), tl.trans(k.to(tl.float16)))
            s = s * (k_scale * qk_scale)[None, :]
        else:
            s = tl.dot(q, tl.trans(k)) * qk_scale  # [G, N], log2 units
        s = tl.where(tok_ok[None, :], s, float("-inf"))
        p, alpha, m, l = _softmax_step(s, m, l)  # noqa: E741
        if FP8:
            pv = tl.dot((p * v_scale[None, :]).to(tl.float16), v.to(tl.float16))
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv

    if SINGLE_SPLIT:
        # An empty sequence (padding in a captured batch) gets zeros, not NaN.
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        dst = out_ptr + seq * stride_out_b + heads[:, None] * stride_out_h + dims[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        part = (seq * tl.num_programs(1) * GROUP + heads) * num_splits + split  # [G]
        partial = acc / tl.where(l > 0, l, 1.0)[:, None]  # normalised within the split
        dst = part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :]
        tl.store(dst, partial, mask=row_ok[:, None])
        tl.store(part_lse_ptr + part, _log_sum_exp(m, l), mask=row_ok)


@triton.jit
def _e4m3_pairs_to_f16(words, HW_CVT: tl.constexpr):  # type: ignore[no-untyped-def]
    """16-bit words holding two e4m3 values -> (low byte's, high byte's) values as fp16."""
    if HW_CVT:  # sm_89 and later: one instruction converts a pair
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; cvt.rn.f16x2.e4m3x2 t, $2; mov.b32 {$0, $1}, t; }",
            "=h,=h,h",
            [words],
            dtype=(tl.float16, tl.float16),
            is_pure=True,
            pack=1,
        )
    low = words.to(tl.int8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
    high = (words >> 8).to(tl.int8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
    return low, high


@triton.jit
def _decode_fp8_words_kernel(  # type: ignore[no-untyped-def]  # Triton kernel: pointer args
    q_ptr,  # [B, Hq, D]
    k_words_ptr,  # [num_blocks, block_size, Hkv, D / 2] int16: the e4m3 cache, two per word
    v_words_ptr,
    block_tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32
    out_ptr,  # [B, Hq, D]; written when SINGLE_SPLIT
    part_out_ptr,  # [B, Hq, num_splits, D] float32; written otherwise
    part_lse_ptr,  # [B, Hq, num_splits] float32 (log2 domain)
    k_scale_ptr,  # [num_blocks, block_size, Hkv] float32
    v_scale_ptr,
    qk_scale,  # softmax scale * log2(e)
    stride_q_b,
    stride_q_h,
    stride_k_block,  # in words
    stride_k_slot,
    stride_k_head,
    stride_v_block,
    stride_v_slot,
    stride_v_head,
    stride_bt_b,
    stride_out_b,
    stride_out_h,
    stride_ks_block,
    stride_ks_slot,
    stride_vs_block,
    stride_vs_slot,
    num_splits,
    split_tokens,  # tokens per split, a multiple of BLOCK_N
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HALF_DIM: tl.constexpr,  # head_dim / 2: words per row
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    HW_CVT: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """``_decode_kernel`` over an FP8 cache read as words: word j of a row holds dimensions 2j
    (low byte) and 2j + 1, so every dot runs twice, over the even and the odd dimensions."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = split * split_tokens
    end = tl.minimum(start + split_tokens, seq_len)

    rows = tl.arange(0, GROUP_PAD)
    row_ok = rows < GROUP
    heads = kv_head * GROUP + rows
    words = tl.arange(0, HALF_DIM)
    q_even_ptr = q_ptr + seq * stride_q_b + heads[:, None] * stride_q_h + 2 * words[None, :]
    q_even = tl.load(q_even_ptr, mask=row_ok[:, None], other=0.0).to(tl.float16)  # [G, D/2]
    q_odd = tl.load(q_even_ptr + 1, mask=row_ok[:, None], other=0.0).to(tl.float16)

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)  # noqa: E741
    acc_even = tl.zeros([GROUP_PAD, HALF_DIM], tl.float32)
    acc_odd = tl.zeros([GROUP_PAD, HALF_DIM], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt_b
    k_base = k_words_ptr + kv_head * stride_k_head
    v_base = v_words_ptr + kv_head * stride_v_head
    for tok0 in range(start, end, BLOCK_N):
        toks = tok0 + tl.arange(0, BLOCK_N)
        tok_ok = toks < end
        block = tl.load(table + toks // BLOCK_SIZE, mask=tok_ok, other=0).to(tl.int64)
        slot = toks % BLOCK_SIZE
        k = tl.load(
            k_base + (block * stride_k_block + slot * stride_k_slot)[:, None] + words[None, :],
            mask=tok_ok[:, None],
            other=0,
        )  # [N, D/2] words
        v = tl.load(
            v_base + (block * stride_v_block + slot * stride_v_slot)[:, None] + words[None, :],
            mask=tok_ok[:, None],
            other=0,
        )
        k_scale, v_scale = _token_scales(
            k_scale_ptr, v_scale_ptr, block, slot, kv_head, tok_ok,
            stride_ks_block, stride_ks_slot, stride_vs_block, stride_vs_slot,
        )  # fmt: skip
        k_even, k_odd = _e4m3_pairs_to_f16(k, HW_CVT)
        s = tl.dot(q_even, tl.trans(k_even))
        s = tl.dot(q_odd, tl.trans(k_odd), s)
        s = s * (k_scale * qk_scale)[None, :]  # [G, N], log2 units
        s = tl.where(tok_ok[None, :], s, float("-inf"))
        p, alpha, m, l = _softmax_step(s, m, l)  # noqa: E741
        p_v = (p * v_scale[None, :]).to(tl.float16)
        v_even, v_odd = _e4m3_pairs_to_f16(v, HW_CVT)
        acc_even = acc_even * alpha[:, None] + tl.dot(p_v, v_even)
        acc_odd = acc_odd * alpha[:, None] + tl.dot(p_v, v_odd)

    norm = 1.0 / tl.where(l > 0, l, 1.0)  # an empty sequence (graph padding) gets zeros
    if SINGLE_SPLIT:
        dst = out_ptr + seq * stride_out_b + heads[:, None] * stride_out_h + 2 * words[None, :]
        dtype = out_ptr.dtype.element_ty
        tl.store(dst, (acc_even * norm[:, None]).to(dtype), mask=row_ok[:, None])
        tl.store(dst + 1, (acc_odd * norm[:, None]).to(dtype), mask=row_ok[:, None])
    else:
        part = (seq * tl.num_programs(1) * GROUP + heads) * num_splits + split  # [G]
        dst = part_out_ptr + part[:, None] * (2 * HALF_DIM) + 2 * words[None, :]
        tl.store(dst, acc_even * norm[:, None], mask=row_ok[:, None])
        tl.store(dst + 1, acc_odd * norm[:, None], mask=row_ok[:, None])
        tl.store(part_lse_ptr + part, _log_sum_exp(m, l), mask=row_ok)


@triton.jit
def _merge_splits_kernel(  # type: ignore[no-untyped-def]  # Triton kernel: pointer args
    part_out_ptr,  # [B, Hq, num_splits, D] float32, each split normalised by its own sum
    part_lse_ptr,  # [B, Hq, num_splits] float32 (log2 domain)
    out_ptr,  # [B, Hq, D]
    stride_out_b,
    stride_out_h,
    num_splits,
    HEAD_DIM: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    PDL: tl.constexpr = False,
):
    if PDL:
        gdc_wait()
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = seq * tl.num_programs(1) + head
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < num_splits
    lse = tl.load(part_lse_ptr + row * num_splits + splits, mask=split_ok, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    # Split i covers a softmax mass of 2^lse_i; the merged output is the mass-weighted mean.
    weight = tl.math.exp2(lse - lse_max)  # [S]
    total = tl.sum(weight, axis=0)
    dims = tl.arange(0, HEAD_DIM)
    acc = tl.load(
        part_out_ptr + (row * num_splits + splits)[:, None] * HEAD_DIM + dims[None, :],
        mask=split_ok[:, None],
        other=0.0,
    )  # [S, D]
    out = tl.sum(acc * weight[:, None], axis=0)
    out = out / tl.where(total > 0, total, 1.0)
    tl.store(
        out_ptr + seq * stride_out_b + head * stride_out_h + dims, out.to(out_ptr.dtype.element_ty)
    )


@cache
def _has_fp8_convert(device: torch.device) -> bool:
    """sm_89 and later convert a pair of e4m3 values in one instruction (PTX cvt ... e4m3x2)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _as_words(cache: torch.Tensor) -> torch.Tensor | None:
    """An FP8 cache viewed as int16 words of two values, or None where its strides or offset
    are odd (never for the engine's caches)."""
    if any(stride % 2 for stride in cache.stride()[:-1]) or cache.storage_offset() % 2:
        return None
    return cache.view(torch.int16)


@cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: few programs keep CPU tests fast
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan_splits(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int, config: DecodeConfig
) -> tuple[int, int]:
    """(num_splits, tokens per split), a function of shapes only (graph-capturable).

    A batch that already gives every SM several programs is not split: the merge would only add
    a launch. A small one is split into as many programs as fit ``split_waves`` per SM, never
    more (rounded down), so that all run at once with the longest splits that fill the GPU; one
    between the two is split finely (``tail_split_waves``), which keeps its last round short.
    """
    max_seq_len = max(max_seq_len, 1)
    base = max(num_seqs * num_kv_heads, 1)
    splits = 1
    if base < config.no_split_waves * num_sms:
        one_round = int(config.split_waves * num_sms)
        if base <= one_round:
            wanted = max(1, one_round // base)
        else:
            wanted = triton.cdiv(int(config.tail_split_waves * num_sms), base)
        splits = max(1, min(wanted, triton.cdiv(max_seq_len, config.min_split_tokens)))
    split_tokens = triton.cdiv(triton.cdiv(max_seq_len, splits), config.block_n) * config.block_n
    return triton.cdiv(max_seq_len, split_tokens), split_tokens


def default_config(head_dim: int, block_size: int, fp8: bool = False) -> DecodeConfig:
    """Tokens per step sized so one K and one V tile are 32 KB each in 16-bit types: enough bytes
    in flight per program to keep HBM busy (measured on H100: 64 -> 128 tokens took 8 x 32k
    from 2.4 to 2.96 TB/s; benchmarks/results/kernels-*.md). An FP8 cache splits finer, to 8
    programs per SM: its programs hold half the shared memory, so more run at once, and each is
    slower per byte (H200 sweep: 8 x 32k 203.8 -> 166.6 us, 16 x 8k 104.3 -> 92.0 us against 2
    per SM; kernels-h200.md)."""
    config = DecodeConfig(block_n=max(block_size, 16384 // head_dim))
    return replace(config, split_waves=config.tail_split_waves) if fp8 else config


def launch_decode(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None,
    max_seq_len: int | None,
    config: DecodeConfig | None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``paged_decode_attention`` with an explicit launch config (the benchmark sweeps it)."""
    _, block_size, num_kv_heads, head_dim = checks.check_cache_pair(k_cache, v_cache)
    fp8 = checks.check_cache_scales(k_cache, k_scale, v_scale)
    device = checks.check_device(
        query=query, k_cache=k_cache, block_tables=block_tables, seq_lens=seq_lens
    )
    checks.check_shape("query", query, (None, None, head_dim), "[num_seqs, num_heads, head_dim]")
    num_seqs, num_heads, _ = query.shape
    group = checks.check_attention_dims(num_heads, num_kv_heads, head_dim)
    checks.check_query_and_cache(query, k_cache)
    checks.check_unit_last_stride("query", query)
    checks.check_shape("block_tables", block_tables, (num_seqs, None), "[num_seqs, max_blocks]")
    checks.check_shape("seq_lens", seq_lens, (num_seqs,), "[num_seqs]")
    checks.check_dtype("block_tables", block_tables, checks.INDEX_DTYPES)
    checks.check_dtype("seq_lens", seq_lens, checks.INDEX_DTYPES)
    checks.check_unit_last_stride("block_tables", block_tables)
    checks.check_contiguous("seq_lens", seq_lens)
    if max_seq_len is None:
        # Without the caller's bound the table's capacity is the bound: no sync, still capturable.
        max_seq_len = block_tables.shape[1] * block_size
    if max_seq_len > block_tables.shape[1] * block_size:
        raise ValueError(
            f"max_seq_len {max_seq_len} exceeds the block table's capacity "
            f"{block_tables.shape[1]} blocks x {block_size} tokens"
        )
    if out is None:
        out = torch.empty_like(query)
    else:
        checks.check_out(out, query)
    if num_seqs == 0:
        return out
    # The words kernel's views: an FP8 cache, head_dim >= 32 (the dots' depth, D / 2, >= 16),
    # and even strides; otherwise None and the cache is read as it is.
    words = fp8 and (config is None or config.fp8_words) and head_dim >= 32
    k_words = _as_words(k_cache) if words else None
    v_words = _as_words(v_cache) if words else None
    words = k_words is not None and v_words is not None
    if config is None:
        config = default_config(head_dim, block_size, fp8)
        if (
            words
            and plan_splits(num_seqs, num_kv_heads, max_seq_len, _num_sms(device), config)[0] == 1
        ):
            # An unsplit grid of the words kernel runs faster with half the tile (H100, D 128,
            # kernels.py sweep: 64 x 4k 248 -> 213 us, 256 x 1k 244 -> 230 us); a split one
            # keeps 128 (8 x 32k 210 vs 218 us, 1 x 32k 37.1 vs 38.2 us).
            config = replace(config, block_n=max(block_size, config.block_n // 2), num_stages=2)
    if config.block_n % block_size and block_size % config.block_n:
        raise ValueError(f"block_n {config.block_n} and block_size {block_size} must nest")
    num_splits, split_tokens = plan_splits(
        num_seqs, num_kv_heads, max_seq_len, _num_sms(device), config
    )
    single = num_splits == 1
    if single:
        part_out = part_lse = out  # unused by the kernel
    else:
        part_out = torch.empty(
            (num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=device
        )
        part_lse = torch.empty(
            (num_seqs, num_heads, num_splits), dtype=torch.float32, device=device
        )
    pdl = checks.launch_options(device)
    if k_words is not None and v_words is not None:
        kernel, k_arg, v_arg = _decode_fp8_words_kernel, k_words, v_words
        dims = {"HALF_DIM": head_dim // 2, "HW_CVT": _has_fp8_convert(device)}
    else:  # a 16-bit cache, or an FP8 one read byte by byte
        kernel, k_arg, v_arg = _decode_kernel, k_cache, v_cache
        dims = {"HEAD_DIM": head_dim, "FP8": fp8}
    kernel[(num_seqs, num_kv_heads, num_splits)](
        query,
        k_arg,
        v_arg,
        block_tables,
        seq_lens,
        out,
        part_out,
        part_lse,
        k_scale if fp8 else seq_lens,  # unused without FP8
        v_scale if fp8 else seq_lens,
        scale * LOG2E,
        query.stride(0),
        query.stride(1),
        *k_arg.stride()[:3],  # in the kernel's elements: words for the words kernel
        *v_arg.stride()[:3],
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        *checks.scale_strides(k_scale, v_scale),
        num_splits,
        split_tokens,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        BLOCK_SIZE=block_size,
        BLOCK_N=config.block_n,
        SINGLE_SPLIT=single,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **dims,
        **pdl,
    )
    if not single:
        _merge_splits_kernel[(num_seqs, num_heads)](
            part_out,
            part_lse,
            out,
            out.stride(0),
            out.stride(1),
            num_splits,
            HEAD_DIM=head_dim,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            num_warps=4,
            **pdl,
        )
    return out


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    max_seq_len: int | None = None,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of query [B, Hq, D] over each sequence's first ``seq_lens[b]`` cached tokens.

    ``max_seq_len`` (an upper bound of ``seq_lens``, a Python int) sets how far the KV sequence
    is split; without it the block table's capacity is used. No host sync: graph-capturable.
    An FP8 cache comes with its scales (``write_kv_cache``).
    """
    return launch_decode(
        query, k_cache, v_cache, block_tables, seq_lens, scale, out, max_seq_len, None,
        k_scale, v_scale,
    )  # fmt: skip
