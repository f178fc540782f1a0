"""Which live allocations keep torch's large default-pool segments reserved after a load.

Loads the engine with the allocator's history on, empties the cache (what a park leaves) and
prints, for every default-pool segment of 64 MiB or more, its live blocks with the Python
frames that allocated them.

    python benchmarks/pinned_blocks.py --shape llama-3.2-1b --model-cache /tmp/berth-models
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from graph_pool import MIB, in_default_pool, large_default_segments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--model-cache", default="/tmp/berth-models")
    parser.add_argument("--max-num-seqs", type=int, default=8)
    args = parser.parse_args()
    from berth.runtime.engine import Engine, EngineConfig
    from berth.runtime.engine.testmodels import make_model

    path = Path(args.model_cache) / f"{args.shape}-bfloat16"
    if not (path / "config.json").exists():
        make_model(args.shape, path, dtype="bfloat16", device="cuda")
    torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
    Engine(EngineConfig(model=str(path), device="cuda", dtype="bfloat16",
                        max_num_seqs=args.max_num_seqs, kv_cache_bytes=1 << 30))  # fmt: skip
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    snapshot = torch.cuda.memory._snapshot()
    default = [s for s in snapshot["segments"] if in_default_pool(s)]
    print(f"default pool after empty_cache: {sum(s['total_size'] for s in default) / MIB:.0f} MiB"
          f" reserved in {len(default)} segments,"
          f" {sum(s['allocated_size'] for s in default) / MIB:.0f} MiB live")  # fmt: skip
    for seg in large_default_segments(snapshot["segments"]):
        print(f"segment {seg['total_size'] / MIB:.0f} MiB")
        for block in seg["blocks"]:
            if block["state"] != "active_allocated":
                continue
            frames = [f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}"
                      for f in block.get("frames", [])][:12]  # fmt: skip
            print(f"  live {block['size'] / MIB:.1f} MiB: " + " <- ".join(frames))


if __name__ == "__main__":
    main()
