"""How long the elastic KV pool takes to grow and shrink on the GPU (CUDA virtual memory).

The llama-3-8b layout (32 layers, 8 KV heads of 128, bf16, blocks of 16 tokens: 2 MiB per
block, chunks of 64 blocks = 128 MiB): map 4 GiB chunk by chunk, unmap half, map it back; then
check that a CUDA graph captured over the tensor before the shrink reads what was written
into the remapped chunks after it. Prints one table.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from berth.runtime.engine.kv_arena import KvArena, KvLayout, device_granularity


def main() -> None:
    dev = torch.device("cuda", 0)
    layout = KvLayout(32, 16, 8, 128, 2, device_granularity(dev))
    chunks = (4 << 30) // layout.chunk_bytes
    arena = KvArena(layout, 2 * chunks, dev, torch.bfloat16)
    rows = []

    def timed(label: str, n: int) -> None:
        torch.cuda.synchronize()
        t = time.perf_counter()
        arena.resize(n)
        torch.cuda.synchronize()
        rows.append((label, (time.perf_counter() - t) * 1e3, arena.mapped_bytes >> 20))

    timed(f"map {chunks} chunks of {layout.chunk_bytes >> 20} MiB", chunks)
    half = chunks // 2
    blocks = layout.chunk_blocks
    probe = arena.tensor[:, :, half * blocks]  # the first block of the upper half: [L, 2, ...]
    out = torch.zeros((), dtype=torch.float32, device=dev)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(probe.float().sum())
    timed(f"unmap {chunks - half} chunks", half)
    timed(f"map {chunks - half} chunks back", chunks)
    arena.tensor[:, :, half * blocks] = 1.0
    graph.replay()
    torch.cuda.synchronize()
    expect = float(probe.numel())
    rows.append(("graph replay after unmap/remap reads new pages", float(out), expect))
    print(f"{'step':58} {'ms':>10} {'MiB mapped / expected':>22}")
    for label, ms, mib in rows:
        print(f"{label:58} {ms:10.2f} {mib:22}")
    assert float(out) == expect, "the graph read stale or unmapped memory"
    arena.close()


if __name__ == "__main__":
    main()
