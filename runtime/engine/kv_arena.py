"""The KV cache's memory: one tensor of fixed shape whose blocks are backed chunk by chunk.

The tensor is ``[num_layers, 2, max_blocks, block_size, kv_heads, head_dim]`` for the most blocks
the runtime's limit could ever hold. Only its first ``num_chunks * chunk_blocks`` blocks are
backed by memory: a chunk is the same run of block ids in each of the ``2 * num_layers`` slabs
(one layer's keys, or its values), so growing maps one more piece at the end of each slab and
shrinking unmaps the last. The tensor, its per-layer views, the block ids and the CUDA graphs
captured over it never move. ``KvBlockPool`` may hand out only backed blocks.

An FP8 cache (``KvLayout.fp8``) holds e4m3 values in the slabs and their float32 scales (one
per token and KV head) in one more slab after them, ``scales [max_blocks, num_layers, 2,
block_size, kv_heads]``: a block's scales for every layer lie together, so a chunk's piece of
the scale slab is as much a multiple of the granularity as its value pieces are (scales beside
each block's values would make a block 16,896 bytes for Llama-3-8B and a chunk 4 GiB), and the
scales grow, shrink, park and copy with their blocks.

On the GPU the pieces are CUDA virtual memory (``cuda_vmm``); on the CPU the same bookkeeping
runs over a tensor allocated for all ``max_blocks`` at once (the OS backs its pages only when
they are touched): the chunk count is a logical bound, so the grow/shrink logic runs in CI.
There, shrinking to no chunk at all (a parked engine) frees the tensor's storage, and growing
from none allocates it again; the views over it follow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from berth.runtime.engine.budget import GpuBudget, KvPlan, plan_kv_pool
from berth.runtime.engine.config import EngineConfig

CPU_GRANULARITY = 16 << 10  # bytes: the CPU build's stand-in for the driver's 2 MiB
# A chunk's piece of each slab on the GPU: at most this large, and a pool of at least
# MIN_CHUNKS chunks (see ``coarsened``).
MAX_PIECE_BYTES = 32 << 20
MIN_CHUNKS = 32
CPU_KV_CACHE_BYTES = 512 << 20  # the CPU's fixed pool without a budget (local use)
SCALE_BYTES = 4  # an FP8 cache's float32 scale per token and KV head
FP8 = torch.float8_e4m3fn


@dataclass(frozen=True)
class KvLayout:
    """The KV tensor's shape and how it splits into chunks; sizes in bytes."""

    num_layers: int
    block_size: int  # tokens per block
    num_kv_heads: int
    head_dim: int
    itemsize: int
    granularity: int  # a chunk's piece of each slab is a multiple of this
    fp8: bool = False  # e4m3 values (itemsize 1) and a float32 scale per token and head

    @property
    def slab_block_bytes(self) -> int:
        """One block of one layer's keys (or values)."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def scale_block_bytes(self) -> int:
        """One block's FP8 scales over all layers, K and V (0 without FP8)."""
        per_token = 2 * self.num_layers * self.num_kv_heads * SCALE_BYTES
        return self.block_size * per_token if self.fp8 else 0

    @property
    def block_bytes(self) -> int:
        return 2 * self.num_layers * self.slab_block_bytes + self.scale_block_bytes

    @property
    def chunk_blocks(self) -> int:
        """Blocks per chunk: the fewest whose piece of every slab (the scale slab's too) is a
        multiple of the granularity."""
        g = self.granularity
        blocks = g // math.gcd(g, self.slab_block_bytes)
        if self.fp8:
            blocks = math.lcm(blocks, g // math.gcd(g, self.scale_block_bytes))
        return blocks

    @property
    def piece_bytes(self) -> int:
        """A chunk's piece of one slab (what one mapping call backs)."""
        return self.chunk_blocks * self.slab_block_bytes

    @property
    def chunk_bytes(self) -> int:
        """Memory one chunk maps, over all slabs."""
        return self.chunk_blocks * self.block_bytes

    def chunks_in(self, nbytes: int) -> int:
        """Whole chunks that fit ``nbytes`` (0 when none does)."""
        return max(0, nbytes) // self.chunk_bytes


class KvArena:
    """The KV tensor and the chunks of it that are backed; ``resize`` maps or unmaps chunks.

    Invariant: chunks ``0..num_chunks-1`` are backed, the rest are not; ``num_chunks`` never
    exceeds ``max_chunks``. Shrinking assumes that nothing reads or writes the given-back
    blocks any more (the engine preempts their holders and waits for the device first).
    """

    def __init__(self, layout: KvLayout, max_chunks: int, device: torch.device, dtype: torch.dtype):
        if max_chunks < 1:
            raise ValueError(f"max_chunks must be >= 1, got {max_chunks}")
        self.layout = layout
        self.max_chunks = max_chunks
        self.device = device
        self.num_chunks = 0
        self.max_blocks = max_chunks * layout.chunk_blocks
        self.slab_bytes = self.max_blocks * layout.slab_block_bytes  # one slab's span
        self.values_bytes = 2 * layout.num_layers * self.slab_bytes  # the scale slab starts here
        shape = (
            layout.num_layers,
            2,
            self.max_blocks,
            layout.block_size,
            layout.num_kv_heads,
            layout.head_dim,
        )
        scale_shape = (
            self.max_blocks,
            layout.num_layers,
            2,
            layout.block_size,
            layout.num_kv_heads,
        )
        if layout.fp8:
            dtype = FP8
        self._range = None
        self.scales: torch.Tensor | None = None  # FP8: [max_blocks, L, 2, block_size, Hkv]
        if device.type == "cuda":
            from berth.runtime.engine.cuda_vmm import VirtualRange

            total = self.values_bytes + self.max_blocks * layout.scale_block_bytes
            self._range = VirtualRange(total, device)
            if layout.granularity % self._range.granularity:
                raise ValueError(
                    f"layout granularity {layout.granularity} is not a multiple of the "
                    f"device's {self._range.granularity}"
                )
            whole = self._range.tensor(torch.uint8, (total,))
            self.tensor = whole[: self.values_bytes].view(dtype).view(shape)
            if layout.fp8:
                self.scales = whole[self.values_bytes :].view(torch.float32).view(scale_shape)
        else:
            self.tensor = torch.empty(shape, dtype=dtype, device=device)
            if layout.fp8:
                self.scales = torch.empty(scale_shape, dtype=torch.float32, device=device)
        self.num_remaps = 0  # chunks mapped or unmapped since start-up (for tests and metrics)

    def layer_caches(
        self, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Layer ``layer``'s (k_cache, v_cache [max_blocks, block_size, Hkv, D], k_scale,
        v_scale [max_blocks, block_size, Hkv] or None): views that never move."""
        k, v = self.tensor[layer, 0], self.tensor[layer, 1]
        if self.scales is None:
            return k, v, None, None
        return k, v, self.scales[:, layer, 0], self.scales[:, layer, 1]

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy whole blocks (all layers, K and V, and their scales)."""
        self.tensor[:, :, dst] = self.tensor[:, :, src]
        if self.scales is not None:
            self.scales[dst] = self.scales[src]

    @property
    def num_blocks(self) -> int:
        """Backed blocks: the most the pool may use."""
        return self.num_chunks * self.layout.chunk_blocks

    @property
    def mapped_bytes(self) -> int:
        return self.num_chunks * self.layout.chunk_bytes

    def resize(self, num_chunks: int) -> None:
        """Map chunks up to, or unmap them down to, ``num_chunks``. A new chunk reads as zeros.
        Out of device memory while growing: raise, with the chunks mapped so far kept."""
        if not 0 <= num_chunks <= self.max_chunks:
            raise ValueError(f"num_chunks must be in [0, {self.max_chunks}], got {num_chunks}")
        tensors = [t for t in (self.tensor, self.scales) if t is not None]
        if self._range is None and self.num_chunks == 0 and num_chunks > 0:
            for t in tensors:
                t.untyped_storage().resize_(t.numel() * t.element_size())
        while self.num_chunks < num_chunks:
            self._map(self.num_chunks)
            blocks = slice(
                self.num_chunks * self.layout.chunk_blocks,
                (self.num_chunks + 1) * self.layout.chunk_blocks,
            )
            self.tensor[:, :, blocks].zero_()
            if self.scales is not None:
                self.scales[blocks].zero_()
            self.num_chunks += 1
            self.num_remaps += 1
        while self.num_chunks > num_chunks:
            self.num_chunks -= 1
            self._unmap(self.num_chunks)
            self.num_remaps += 1
        if self._range is None and num_chunks == 0:
            for t in tensors:
                t.untyped_storage().resize_(0)

    def _pieces(self, chunk: int) -> list[tuple[int, int]]:
        """(offset, size) of the chunk's piece in each slab (and the scale slab's)."""
        lay = self.layout
        piece = lay.piece_bytes
        pieces = [(s * self.slab_bytes + chunk * piece, piece) for s in range(2 * lay.num_layers)]
        if lay.fp8:
            scale_piece = lay.chunk_blocks * lay.scale_block_bytes
            pieces.append((self.values_bytes + chunk * scale_piece, scale_piece))
        return pieces

    def _map(self, chunk: int) -> None:
        """Back every slab's piece of ``chunk``, or none of them (out of memory: raise)."""
        if self._range is None:
            return
        done: list[int] = []
        try:
            for offset, size in self._pieces(chunk):
                self._range.map(offset, size)
                done.append(offset)
        except Exception:
            for offset in done:
                self._range.unmap(offset)
            raise

    def _unmap(self, chunk: int) -> None:
        if self._range is None:
            return
        for offset, _ in self._pieces(chunk):
            self._range.unmap(offset)

    def close(self) -> None:
        if self._range is not None:
            self._range.close()
            self._range = None
        self.num_chunks = 0


def coarsened(layout: KvLayout, kv_bytes: int) -> KvLayout:
    """The layout with the coarsest granularity (a power-of-two multiple of its own, pieces of
    at most ``MAX_PIECE_BYTES``) that still cuts ``kv_bytes`` into ``MIN_CHUNKS`` chunks.

    Each piece costs the driver three calls (create, map, set access; two to give it back) of
    about 50 us whatever its size, measured on an H200 with 2 MiB pieces: a Llama-3-8B pool
    of 29 GiB in the driver's 2 MiB granules is 14,848 pieces, 0.7 s to map on a wake and as
    long to give back on a park. In 8 MiB pieces the same pool is 3,712 of them, and still 58
    chunks of 512 MiB for growing and shrinking; at least ``MIN_CHUNKS`` chunks bound what a
    budget loses to rounding down to whole chunks (under 1/32)."""
    best = layout
    multiple = 2
    while True:
        candidate = replace(layout, granularity=layout.granularity * multiple)
        if (
            candidate.piece_bytes > MAX_PIECE_BYTES
            or kv_bytes // candidate.chunk_bytes < MIN_CHUNKS
        ):
            return best
        best, multiple = candidate, multiple * 2


def device_granularity(device: torch.device) -> int:
    """The driver's allocation granularity on the GPU; the CPU build's stand-in elsewhere."""
    if device.type != "cuda":
        return CPU_GRANULARITY
    from berth.runtime.engine.cuda_vmm import VirtualRange

    probe = VirtualRange(1, device)  # reserves one granule of address space, maps nothing
    try:
        return probe.granularity
    finally:
        probe.close()


def reserve_kv_arena(
    config: EngineConfig,
    layout: KvLayout,
    budget: GpuBudget | None,
    weights_bytes: int,
    device: torch.device,
    dtype: torch.dtype,
    max_blocks_per_seq: int,
) -> tuple[KvArena, int | None]:
    """Reserve the KV tensor for the most blocks the runtime may ever hold, with one chunk
    backed (for the profile run and the graph capture). With a budget (and no configured
    size) that is the limit's share beside the weights, and the pool is sized later
    (``fit_kv_arena``); else a fixed pool of the configured (or the CPU default) size, whose
    block count is returned too."""
    explicit = config.num_kv_blocks is not None or config.kv_cache_bytes is not None
    fixed: int | None = None
    most = config.max_num_seqs * max_blocks_per_seq  # the running batch at full length
    cpu_blocks = CPU_KV_CACHE_BYTES // layout.block_bytes
    if explicit:
        fixed = config.num_kv_blocks or (config.kv_cache_bytes or 0) // layout.block_bytes
        chunks = -(-fixed // layout.chunk_blocks)
    elif budget is not None:
        chunks = layout.chunks_in(budget.limit_bytes - weights_bytes)
        if chunks < 1:  # not even the weights and one chunk: say so with the numbers
            plan_kv_pool(budget, weights_bytes, 0, layout.chunk_bytes)
        if device.type != "cuda":
            # The CPU build's budget is a logical GPU's (a simulated 80 GiB card, say): back at
            # most what the running batch can use at once, within the CPU default, not 40 GiB
            # of host memory. The plan still counts chunks against the budget.
            chunks = min(chunks, -(-min(most, cpu_blocks) // layout.chunk_blocks))
    else:
        fixed = min(cpu_blocks, most)
        chunks = -(-fixed // layout.chunk_blocks)
    if chunks < 1 or fixed == 0:
        raise ValueError(
            f"no room for a single KV block ({layout.block_bytes} bytes): give the engine "
            "more memory or set kv_cache_bytes / num_kv_blocks"
        )
    arena = KvArena(layout, chunks, device, dtype)
    arena.resize(1)
    return arena, fixed


def fit_kv_arena(arena: KvArena, plan: KvPlan | None, fixed_blocks: int | None) -> int:
    """Back the pool at start-up: the budget's request (``plan``), or all of a fixed pool,
    which must fit the request when there is a budget. Returns the pool's blocks."""
    if fixed_blocks is None:
        assert plan is not None
        arena.resize(min(plan.request_chunks, arena.max_chunks))
        return arena.num_blocks
    if plan is not None and arena.max_chunks > plan.request_chunks:
        raise ValueError(
            f"the configured KV pool ({fixed_blocks} blocks in {arena.max_chunks} chunks) does "
            f"not fit the GPU memory request beside weights and workspace "
            f"({plan.request_chunks} chunks)"
        )
    arena.resize(arena.max_chunks)
    return fixed_blocks
