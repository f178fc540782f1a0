"""The PyTorch references are the specification: check them against token-by-token attention
written from the layout's definition, in float64, including ragged lengths and garbage in the
unused tail of the block table."""

from __future__ import annotations

import torch
from paged_checks import poison_chunk_slots

from berth.kernels import reference
from berth.kernels.synthetic import random_paged_batch


def attend_one(
    q: torch.Tensor, batch_k: torch.Tensor, batch_v: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [Hq, D] over keys/values [L, Hkv, D], GQA by integer division of the head index."""
    group = q.shape[0] // batch_k.shape[1]
    out = torch.empty_like(q)
    for h in range(q.shape[0]):
        scores = batch_k[:, h // group] @ q[h] * scale
        out[h] = torch.softmax(scores, 0) @ batch_v[:, h // group]
    return out


def cached_tokens(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """Token t of a sequence lives at slot table[t // block_size] * block_size + t % block_size."""
    bs = cache.shape[1]
    return torch.stack([cache[int(table[t // bs]), t % bs] for t in range(length)])


def test_decode_reference_matches_per_token_definition() -> None:
    batch = random_paged_batch([1, 13, 37], 2, 8, 4, torch.float64, "cpu")
    query = torch.randn(3, 6, 8, dtype=torch.float64)
    out = reference.paged_decode_attention(
        query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, 0.3
    )
    for b, length in enumerate(batch.seq_lens.tolist()):
        k = cached_tokens(batch.k_cache, batch.block_tables[b], length)
        v = cached_tokens(batch.v_cache, batch.block_tables[b], length)
        torch.testing.assert_close(out[b], attend_one(query[b], k, v, 0.3))


def test_prefill_reference_is_decode_at_each_position() -> None:
    """Query i of a chunk is a decode step at its own position: causal, prefix included."""
    batch = random_paged_batch([21, 45, 9], 2, 8, 4, torch.float64, "cpu")
    qsl = torch.tensor([0, 21, 34, 35], dtype=torch.int32)
    query = torch.randn(35, 4, 8, dtype=torch.float64)
    out = reference.paged_prefill_attention(
        query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, qsl, 0.25
    )
    for b, length in enumerate(batch.seq_lens.tolist()):
        start, end = int(qsl[b]), int(qsl[b + 1])
        k = cached_tokens(batch.k_cache, batch.block_tables[b], length)
        v = cached_tokens(batch.v_cache, batch.block_tables[b], length)
        for i in range(end - start):
            visible = length - (end - start) + i + 1
            expected = attend_one(query[start + i], k[:visible], v[:visible], 0.25)
            torch.testing.assert_close(out[start + i], expected)


def test_prefill_reference_takes_the_chunk_from_key_value() -> None:
    """Given key/value, the chunk's own K/V come from them, not from the cache (whose chunk
    slots hold NaN here); the prefix still comes from the cache."""
    batch = random_paged_batch([21, 45, 9], 2, 8, 4, torch.float64, "cpu")
    query_lens = [21, 13, 1]
    qsl = torch.tensor([0, 21, 34, 35], dtype=torch.int32)
    query = torch.randn(35, 4, 8, dtype=torch.float64)
    args = (batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, qsl, 0.25)
    expected = reference.paged_prefill_attention(query, *args)
    key, value = batch.chunk_kv(query_lens)
    poison_chunk_slots(batch, query_lens)
    out = reference.paged_prefill_attention(query, *args, key=key, value=value)
    torch.testing.assert_close(out, expected)


def test_write_reference_scatters_by_slot_and_skips_padding() -> None:
    cache_k = torch.randn(4, 4, 2, 8)
    cache_v = torch.randn(4, 4, 2, 8)
    before_k = cache_k.clone()
    key, value = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    reference.write_kv_cache(key, value, cache_k, cache_v, torch.tensor([6, -1, 15]))
    assert torch.equal(cache_k[1, 2], key[0]) and torch.equal(cache_k[3, 3], key[2])
    assert torch.equal(cache_v[1, 2], value[0])
    changed = (cache_k != before_k).any(dim=(2, 3))
    assert changed.sum() == 2  # the padding token wrote nothing
