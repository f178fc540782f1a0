"""Random paged KV batches for the kernel tests and benchmarks.

Built to catch indexing bugs rather than to look like real data: pages are scattered through
the cache in random order, every slot no sequence owns (spare blocks, the tail of each last
page) holds NaN, and block-table entries past a sequence's last page point far outside the
cache. A kernel that reads one element it should not returns NaN or faults.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

UNUSED_BLOCK = 2**30  # block-table filler: out of range for any cache a test allocates


@dataclass(frozen=True)
class PagedBatch:
    """A paged KV cache and the tables that describe which pages each sequence owns."""

    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32

    @property
    def block_size(self) -> int:
        return self.k_cache.shape[1]

    def contiguous(self, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence ``seq``'s keys and values gathered into [Hkv, L, D] (for SDPA baselines)."""
        length = int(self.seq_lens[seq])
        pages = self.block_tables[seq, : -(-length // self.block_size)].long()
        hkv, d = self.k_cache.shape[2:]
        k = self.k_cache[pages].reshape(-1, hkv, d)[:length]
        v = self.v_cache[pages].reshape(-1, hkv, d)[:length]
        return k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()

    def chunk_kv(self, query_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sequence's last ``query_lens[b]`` tokens (its new chunk), K and V packed
        [sum(query_lens), Hkv, D] in batch order: what the engine passes to prefill as key/value."""
        keys, values = [], []
        for seq, q_len in enumerate(query_lens):
            k, v = self.contiguous(seq)  # [Hkv, L, D]
            keys.append(k[:, k.shape[1] - q_len :].transpose(0, 1))
            values.append(v[:, v.shape[1] - q_len :].transpose(0, 1))
        return torch.cat(keys).contiguous(), torch.cat(values).contiguous()


def random_paged_batch(
    seq_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    spare_blocks: int = 3,
    spare_columns: int = 2,
    share_first_page: bool = False,
    poison_unused: bool = True,
    generator: torch.Generator | None = None,
) -> PagedBatch:
    """Scatter each sequence's pages randomly over a cache with ``spare_blocks`` unowned blocks.

    ``share_first_page`` makes every sequence reuse sequence 0's first page (a shared prefix);
    ``poison_unused=False`` skips the NaN fill where a benchmark only needs the bytes.
    ``generator`` (on ``device``) draws the values; the page order uses the global CPU RNG.
    """
    pages_per_seq = [-(-n // block_size) for n in seq_lens]
    if share_first_page:
        own = [pages_per_seq[0]] + [max(p - 1, 0) for p in pages_per_seq[1:]]
    else:
        own = pages_per_seq
    num_blocks = sum(own) + spare_blocks
    order = torch.randperm(num_blocks).tolist()
    width = max(pages_per_seq, default=0) + spare_columns
    table = torch.full((len(seq_lens), width), UNUSED_BLOCK, dtype=torch.int32)
    cursor = 0
    for b, (pages, owned) in enumerate(zip(pages_per_seq, own, strict=True)):
        start = pages - owned  # 1 when the first page is borrowed from sequence 0
        if start:
            table[b, 0] = table[0, 0]
        table[b, start:pages] = torch.tensor(order[cursor : cursor + owned], dtype=torch.int32)
        cursor += owned
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    v_cache = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    if poison_unused:
        owned_slots = torch.zeros(num_blocks * block_size, dtype=torch.bool)
        for b, n in enumerate(seq_lens):
            seq_pages = table[b, : pages_per_seq[b]].long()
            slots = (seq_pages[:, None] * block_size + torch.arange(block_size)).flatten()[:n]
            owned_slots[slots] = True
        flat_k = k_cache.view(-1, num_kv_heads, head_dim)
        flat_v = v_cache.view(-1, num_kv_heads, head_dim)
        unowned = (~owned_slots).to(device)
        flat_k[unowned] = float("nan")
        flat_v[unowned] = float("nan")
    return PagedBatch(
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=table.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
    )
