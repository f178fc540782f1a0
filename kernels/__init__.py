"""Berth's paged-attention kernels (Triton) and their PyTorch references.

KV cache layout, shared by every kernel and the runtime (one tensor per layer for K and one for V):

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], the model's dtype.
    A token's slot is ``block_id * block_size + offset``; ``block_tables[b, i]`` (int32
    [num_seqs, max_blocks_per_seq]) is the block holding tokens ``i*block_size ..`` of sequence
    b; entries past a sequence's last page are never read. ``seq_lens`` (int32 [num_seqs]) counts
    the tokens in the cache per sequence, including the ones being computed now.

Token-major pages keep one token's heads together, so ``write_kv_cache`` stores each new token
as one contiguous run and the attention kernels read a head's page rows with unit stride.
``paged_prefill_attention`` also takes the step's new K/V as ``key``/``value`` [T, Hkv, D]
(the tensors just written to the cache) and then reads the chunks' own keys from them, by TMA,
and only the cached prefix through the block table. ``rope_write_kv_cache`` is the engine's
write on the GPU: RoPE (after Qwen3's q/k norm) and the cache write in one kernel.
"""

from berth.kernels.decode import paged_decode_attention
from berth.kernels.kv_cache import write_kv_cache
from berth.kernels.prefill import paged_prefill_attention
from berth.kernels.rope_kv import rope_write_kv_cache

__all__ = [
    "paged_decode_attention",
    "paged_prefill_attention",
    "rope_write_kv_cache",
    "write_kv_cache",
]
