"""The KV cache's memory: one tensor of fixed shape whose blocks are backed chunk by chunk.

The tensor is ``[num_layers, 2, max_blocks, block_size, kv_heads, head_dim]`` for the most blocks
the runtime's limit could ever hold. Only its first ``num_chunks * chunk_blocks`` blocks are
backed by memory: a chunk is the same run of block ids in each of the ``2 * num_layers`` slabs
(one layer's keys, or its values), so growing maps one more piece at the end of each slab and
shrinking unmaps the last. The tensor, its per-layer views, the block ids and the CUDA graphs
captured over it never move. ``KvBlockPool`` may hand out only backed blocks.

An FP8 cache (``KvLayout.fp8``) keeps each block's float32 scales (one per token and KV head)
right after its e4m3 values, inside the same slab: the tensor is then raw bytes
``[num_layers, 2, max_blocks, slab_block_bytes]`` and ``layer_caches`` cuts the typed views, so
the scales grow, shrink, park and copy with their blocks.

On the GPU the pieces are CUDA virtual memory (``cuda_vmm``); on the CPU the same bookkeeping
runs over a tensor allocated for all ``max_blocks`` at once (the OS backs its pages only when
they are touched): the chunk count is a logical bound, so the grow/shrink logic runs in CI.
There, shrinking to no chunk at all (a parked engine) frees the tensor's storage, and growing
from none allocates it again; the views over it follow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from berth.runtime.engine.budget import GpuBudget, KvPlan, plan_kv_pool
from berth.runtime.engine.config import EngineConfig

CPU_GRANULARITY = 16 << 10  # bytes: the CPU build's stand-in for the driver's 2 MiB
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
    def values_bytes(self) -> int:
        """One block of one layer's keys (or values), without scales."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def slab_block_bytes(self) -> int:
        """One block of one layer's keys (or values), with an FP8 block's scales."""
        scales = self.block_size * self.num_kv_heads * SCALE_BYTES if self.fp8 else 0
        return self.values_bytes + scales

    @property
    def block_bytes(self) -> int:
        return 2 * self.num_layers * self.slab_block_bytes

    @property
    def chunk_blocks(self) -> int:
        """Blocks per chunk: the fewest whose slab piece is a multiple of the granularity."""
        return math.lcm(self.granularity, self.slab_block_bytes) // self.slab_block_bytes

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
        shape: tuple[int, ...] = (
            layout.num_layers,
            2,
            self.max_blocks,
            layout.block_size,
            layout.num_kv_heads,
            layout.head_dim,
        )
        if layout.fp8:
            dtype, shape = torch.uint8, (*shape[:3], layout.slab_block_bytes)
        self._range = None
        if device.type == "cuda":
            from berth.runtime.engine.cuda_vmm import VirtualRange

            self._range = VirtualRange(2 * layout.num_layers * self.slab_bytes, device)
            if self._range.granularity != layout.granularity:
                raise ValueError(
                    f"layout granularity {layout.granularity} != the device's "
                    f"{self._range.granularity}"
                )
            self.tensor = self._range.tensor(dtype, shape)
        else:
            self.tensor = torch.empty(shape, dtype=dtype, device=device)
        self.num_remaps = 0  # chunks mapped or unmapped since start-up (for tests and metrics)

    def layer_caches(
        self, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Layer ``layer``'s (k_cache, v_cache [max_blocks, block_size, Hkv, D], k_scale,
        v_scale [max_blocks, block_size, Hkv] or None): views that never move."""
        lay = self.layout
        if not lay.fp8:
            return self.tensor[layer, 0], self.tensor[layer, 1], None, None
        views: list[torch.Tensor] = []
        for kind in (0, 1):
            raw = self.tensor[layer, kind]  # [max_blocks, slab_block_bytes]
            shape = (self.max_blocks, lay.block_size, lay.num_kv_heads, lay.head_dim)
            views.append(raw[:, : lay.values_bytes].view(FP8).view(shape))
        for kind in (0, 1):
            raw = self.tensor[layer, kind]
            scales = raw[:, lay.values_bytes :].view(torch.float32)
            views.append(scales.view(self.max_blocks, lay.block_size, lay.num_kv_heads))
        return views[0], views[1], views[2], views[3]

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
        storage = self.tensor.untyped_storage()
        if self._range is None and self.num_chunks == 0 and num_chunks > 0:
            storage.resize_(self.tensor.numel() * self.tensor.element_size())
        while self.num_chunks < num_chunks:
            self._map(self.num_chunks)
            blocks = self.layout.chunk_blocks
            self.tensor[:, :, self.num_chunks * blocks : (self.num_chunks + 1) * blocks].zero_()
            self.num_chunks += 1
            self.num_remaps += 1
        while self.num_chunks > num_chunks:
            self.num_chunks -= 1
            self._unmap(self.num_chunks)
            self.num_remaps += 1
        if self._range is None and num_chunks == 0:
            storage.resize_(0)

    def _pieces(self, chunk: int) -> list[tuple[int, int]]:
        """(offset, size) of the chunk's piece in each slab."""
        piece = self.layout.chunk_blocks * self.layout.slab_block_bytes
        return [
            (s * self.slab_bytes + chunk * piece, piece) for s in range(2 * self.layout.num_layers)
        ]

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
