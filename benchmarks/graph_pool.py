"""What the CUDA graphs' memory pool holds, by the largest prefill/mixed graph captured.

A parked runtime keeps its graphs and their pool (so they replay after a wake); what the pool
holds is what parking cannot give back. For each ``--tops`` value of
``max_prefill_graph_tokens`` (0: decode graphs only) a fresh process loads the engine and
reports torch's allocator after ``empty_cache`` (what a park leaves): bytes reserved in the
default pool and in graph pools, and how much of each is live tensors.

    python benchmarks/graph_pool.py --model /tmp/berth-models/llama-3-8b-bfloat16 \\
        --tops 0,512,1024,2048 --out graph-pool.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MIB = 1 << 20
LARGE_SEGMENT = 64 * MIB


def in_default_pool(segment: dict) -> bool:
    """A segment of torch's default pool, not of a CUDA graph's private one."""
    return tuple(segment.get("segment_pool_id", (0, 0))) == (0, 0)


def large_default_segments(segments: list[dict]) -> list[dict]:
    """The default pool's segments of ``LARGE_SEGMENT`` or more: where one live block keeps
    a large reservation that a park cannot give back."""
    return [s for s in segments if in_default_pool(s) and s["total_size"] >= LARGE_SEGMENT]


def child(args: argparse.Namespace, top: int) -> dict:
    import time

    import torch

    from berth.runtime.engine import Engine, EngineConfig

    started = time.perf_counter()
    engine = Engine(
        EngineConfig(model=args.model, device="cuda", dtype="bfloat16",
                     max_num_seqs=args.max_num_seqs, kv_cache_bytes=int(args.kv_gib * 2**30),
                     max_prefill_graph_tokens=top)
    )  # fmt: skip
    load_s = time.perf_counter() - started
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    segments = torch.cuda.memory_snapshot()
    pools: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for segment in segments:
        name = "default" if in_default_pool(segment) else "graphs"
        pools[name][0] += segment["total_size"]
        pools[name][1] += segment["allocated_size"]
    large = [  # what keeps them reserved
        {"total": seg["total_size"], "live": [b["size"] for b in seg["blocks"]
                                              if b["state"] == "active_allocated"]}
        for seg in large_default_segments(segments)
    ]  # fmt: skip
    runner = engine.runner
    return {
        "large_default_segments": large,
        "top": top,
        "prefill_graphs": len(runner.prefill_graphs),
        "decode_graphs": len(runner.graphs),
        "reserved": torch.cuda.memory_reserved(),
        "allocated": torch.cuda.memory_allocated(),
        "pools": dict(pools),
        "capture_s": runner.graph_capture_seconds,
        "load_s": load_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tops", default="0,512,1024,2048")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--kv-gib", type=float, default=8.0)
    parser.add_argument("--out", default="graph-pool.md")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args, args.child)))
        return
    rows = []
    for top in (int(t) for t in args.tops.split(",")):
        command = [sys.executable, __file__, "--model", args.model, "--child", str(top),
                   "--max-num-seqs", str(args.max_num_seqs), "--kv-gib", str(args.kv_gib)]  # fmt: skip
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(out.stderr[-3000:], flush=True)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    lines = [
        f"# CUDA graph pool by the largest prefill graph ({Path(args.model).name}, "
        f"max_num_seqs {args.max_num_seqs})",
        "",
        "| max_prefill_graph_tokens | graphs (prefill + decode) | reserved after empty_cache (MiB)"
        " | in graph pools (MiB, live) | default pool (MiB, live) | capture (s) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        graphs, default = r["pools"].get("graphs", [0, 0]), r["pools"].get("default", [0, 0])
        lines.append(
            f"| {r['top']} | {r['prefill_graphs']} + {r['decode_graphs']} | "
            f"{r['reserved'] / MIB:.0f} | {graphs[0] / MIB:.0f} ({graphs[1] / MIB:.0f}) | "
            f"{default[0] / MIB:.0f} ({default[1] / MIB:.0f}) | {r['capture_s']:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
