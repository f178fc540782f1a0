"""Pure-PyTorch paged attention: the specification the Triton kernels are tested against.

Same names and signatures as ``berth.kernels`` (see the layout in ``berth.kernels``'s module
docstring). These run on any device and dtype; they gather the pages of a whole batch in one
indexing operation and hand the attention itself to ``scaled_dot_product_attention``, so the
engine's CPU path can use them directly. Scores and softmax run in at least float32 (float64
inputs stay float64, which is what the tests use as ground truth); the result is cast back to
the query's dtype. An FP8 cache is dequantized as it is gathered: value = e4m3 x the token's
per-head scale (``quantize_fp8`` is the rule ``write_kv_cache`` stores by).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from berth.kernels.checks import FP8


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, float64 for float64: never compute softmax in 16 bits."""
    return torch.promote_types(dtype, torch.float32)


FP8_MAX = 448.0  # e4m3's largest finite value
FP8_TINY = 1e-12  # an all-zero row still gets a usable scale


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (e4m3 [..., D], float32 scale [...]): each row's largest magnitude maps
    to 448, so nothing saturates."""
    x32 = x.float()
    scale = x32.abs().amax(dim=-1).clamp(min=FP8_TINY) / FP8_MAX
    return (x32 / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def _gather_tokens(
    cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    num_tokens: int,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The first ``num_tokens`` slots of each sequence's pages: [B, num_tokens, Hkv, D]
    (dequantized with ``scale`` [num_blocks, block_size, Hkv] from an FP8 cache).

    Slots at or past a sequence's length come back as zeros, whatever the cache or the unused
    tail of the block table holds there (the layout leaves both undefined).
    """
    block_size = cache.shape[1]
    num_pages = -(-num_tokens // block_size)
    pages = block_tables[:, :num_pages].long()  # [B, P]
    owned = torch.arange(num_pages, device=pages.device)[None, :] * block_size < seq_lens[
        :, None
    ].to(pages.device)
    index = torch.where(owned, pages, 0)
    tokens = cache[index]  # [B, P, block_size, Hkv, D]
    if scale is not None:
        tokens = tokens.float() * scale[index][..., None]
    b, p = pages.shape
    tokens = tokens.reshape(b, p * block_size, cache.shape[2], cache.shape[3])[:, :num_tokens]
    positions = torch.arange(num_tokens, device=cache.device)
    visible = positions[None, :] < seq_lens[:, None].to(cache.device)  # [B, L]
    return tokens.masked_fill(~visible[:, :, None, None], 0)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Scatter key/value [T, Hkv, D] into the caches at ``slot_mapping`` [T]; slot < 0 skips.
    An FP8 cache stores ``quantize_fp8`` of each token's heads and their scales."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_size = k_cache.shape[1]
    for new, cache, scales in ((key, k_cache, k_scale), (value, v_cache, v_scale)):
        flat = cache.view(-1, *cache.shape[2:])  # [num_slots, Hkv, D]
        if cache.dtype != FP8:
            flat[slots] = new[keep].to(cache.dtype)
            continue
        if scales is None:
            raise ValueError("an FP8 cache needs k_scale and v_scale")
        quantized, scale = quantize_fp8(new[keep])
        flat[slots] = quantized
        # A layer's scales are a strided view (the engine keeps a block's scales for all
        # layers together): indexed by (block, offset), not flattened.
        scales[slots // block_size, slots % block_size] = scale


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
    """Rotate query [T, Hq, D] and key [T, Hkv, D] in place by cos/sin [T, D], then
    ``write_kv_cache``. The rotation runs in float32 (float64 stays float64) and rounds once
    to the input's dtype, as the fused kernel and the compiled RoPE do (Hugging Face's eager
    RoPE rounds after each operation). With ``q_norm``/``k_norm`` [D], each head is first
    RMS-normalized as Hugging Face does (float32 statistics, the weight applied in the input's
    dtype): Qwen3."""
    compute = _compute_dtype(query.dtype)
    c, s = cos[:, None, :].to(compute), sin[:, None, :].to(compute)
    half = query.shape[-1] // 2
    for x, weight in ((query, q_norm), (key, k_norm)):
        x32 = x.to(compute)
        if weight is not None:
            f32 = x.float()  # Hugging Face's statistics: float32 whatever the input
            normed = f32 * torch.rsqrt(f32.pow(2).mean(-1, keepdim=True) + eps)
            x32 = (weight * normed.to(x.dtype)).to(compute)
        rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
        x.copy_((x32 * c + rotated * s).to(x.dtype))
    write_kv_cache(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


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
    """One query token per sequence ([B, Hq, D]) attending to its first ``seq_lens[b]`` tokens.

    The batch is padded to ``max_seq_len`` (read from ``seq_lens`` when not given) and the
    padding masked out, so the whole batch is one gather and one attention call.
    """
    num_seqs, num_heads, _ = query.shape
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max().item()) if num_seqs > 0 else 0
    if out is None:
        out = torch.empty_like(query)
    if num_seqs == 0 or max_seq_len == 0:
        return out
    dtype = _compute_dtype(query.dtype)
    keys = _gather_tokens(k_cache, block_tables, seq_lens, max_seq_len, k_scale).to(dtype)
    values = _gather_tokens(v_cache, block_tables, seq_lens, max_seq_len, v_scale).to(dtype)
    positions = torch.arange(max_seq_len, device=query.device)
    visible = positions[None, :] < seq_lens[:, None].to(query.device)  # [B, L]
    num_kv_heads = k_cache.shape[2]
    # GQA as extra query rows: [B, Hkv, G, D] against [B, Hkv, L, D], no K/V repetition.
    attn = F.scaled_dot_product_attention(
        query.to(dtype).view(num_seqs, num_kv_heads, num_heads // num_kv_heads, -1),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=visible[:, None, None, :],
        scale=scale,
    )
    out.copy_(attn.reshape(num_seqs, num_heads, -1))
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
    """Packed new tokens [T, Hq, D] attending causally to their cached prefix and to themselves.

    Query token i of sequence b sits at absolute position ``seq_lens[b] - q_len_b + i`` and sees
    positions up to and including it. The prefix comes from the cache; the new tokens' own K/V
    from ``key``/``value`` [T, Hkv, D] when given, else from the cache (``write_kv_cache``
    first). One attention call per sequence: lengths differ too much between a prefill chunk
    and a decode token to pad the batch.
    """
    num_heads = query.shape[1]
    if out is None:
        out = torch.empty_like(query)
    dtype = _compute_dtype(query.dtype)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    for b, context_len in enumerate(lens):
        q_start, q_end = starts[b], starts[b + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        table, length = block_tables[b : b + 1], seq_lens[b : b + 1]
        cached = context_len if key is None else context_len - q_len
        keys = _gather_tokens(k_cache, table, length, cached, k_scale)[0]  # [L, Hkv, D]
        values = _gather_tokens(v_cache, table, length, cached, v_scale)[0]
        if key is not None and value is not None:
            keys = torch.cat([keys, key[q_start:q_end].to(keys.dtype)])
            values = torch.cat([values, value[q_start:q_end].to(values.dtype)])
        q_pos = torch.arange(context_len - q_len, context_len, device=query.device)
        k_pos = torch.arange(context_len, device=query.device)
        causal = k_pos[None, :] <= q_pos[:, None]  # [q_len, L]
        # GQA as extra query rows: [Hkv, G * q_len, D] against [Hkv, L, D].
        q = query[q_start:q_end].to(dtype).view(q_len, num_kv_heads, group, -1)
        attn = F.scaled_dot_product_attention(
            q.permute(1, 2, 0, 3).reshape(num_kv_heads, group * q_len, -1),
            keys.to(dtype).transpose(0, 1),
            values.to(dtype).transpose(0, 1),
            attn_mask=causal.repeat(group, 1),
            scale=scale,
        )
        attn = attn.view(num_kv_heads, group, q_len, -1).permute(2, 0, 1, 3)
        out[q_start:q_end] = attn.reshape(q_len, num_heads, -1).to(out.dtype)
    return out
