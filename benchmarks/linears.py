"""A decode step's linears: cuBLAS against ``kernels/skinny_linear.py``, at the read rate.

Llama-3-8B's linears (QKV, O, gate/up, down, the LM head) at a decode batch of M rows read their
weights once: bytes = weight + M rows in and out. Each shape gets as many weight copies as the
model has layers (the LM head two), and one CUDA graph calls the linear once per copy, so the
weights stream from HBM, as in a step, never from L2. Timed: cuBLAS (``F.linear``, what the
engine runs) and the skinny kernel over a grid of tiles, splits and pipeline depths; each
variant is first checked against cuBLAS. Then the whole model's linears in model order, as the
step runs them, with cuBLAS and with the best skinny launch per shape. The read rate is measured
in the same run.

    PYTHONPATH=. python benchmarks/linears.py --out $OUT      # on the GPU machine

Writes ``linears-<gpu>.md`` and ``.json`` to --out.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
import triton

from benchmarks.kernels import measure_bandwidth
from berth.kernels.skinny_linear import SkinnyConfig, block_m, skinny_linear, split_for

# name: (N, K, copies) for Llama-3-8B (32 layers)
SHAPES = {
    "qkv": (6144, 4096, 32),
    "o": (4096, 4096, 32),
    "gate_up": (28672, 4096, 32),
    "down": (4096, 14336, 32),
    "lm_head": (128256, 4096, 2),
}
SMEM_BYTES = 220 * 1024  # H100/H200: 227 KiB a block, less Triton's own


def graph_ms(calls: list[Callable[[], object]], repeats: int = 11) -> float:
    """Median ms of one replay of a CUDA graph that makes ``calls`` in order."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()  # compile, warm cuBLAS's handles outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del graph
    return statistics.median(times)


def configs(m: int, n: int, k: int, sms: int) -> list[SkinnyConfig]:
    """The grid, less what does not fit in shared memory."""
    out = []
    grid = [*itertools.product((64, 128), (128, 256), (3, 4, 6), (4,)), (128, 128, 4, 8)]
    for bn, bk, stages, warps in grid:
        if stages * (bn + block_m(m)) * bk * 2 > SMEM_BYTES:
            continue
        auto = split_for(n, k, SkinnyConfig(block_n=bn, block_k=bk), sms)
        for split in sorted({auto, auto * 2}):
            if split * bk <= k:
                out.append(SkinnyConfig(bn, bk, split, stages, warps))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--rows", default="64,1,16,128", help="decode batch sizes M, the most wanted first"
    )
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--budget-s", type=float, default=420, help="stop sweeping after this")
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    started = time.monotonic()
    dev = torch.cuda.get_device_properties(0)
    sms = dev.multi_processor_count
    bw = measure_bandwidth()
    read = bw["triton_read"]
    print(f"{dev.name}: read {read / 1e12:.2f} TB/s", flush=True)
    torch.manual_seed(0)
    weights = {
        name: [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k**0.5 for _ in range(c)]
        for name, (n, k, c) in SHAPES.items()
        if name in args.shapes.split(",")
    }
    rows = [int(r) for r in args.rows.split(",")]
    results: list[dict[str, Any]] = []
    best: dict[tuple[str, int], SkinnyConfig] = {}
    for m, (name, ws) in itertools.product(rows, weights.items()):
        n, k = ws[0].shape
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        outs = [torch.empty(m, n, dtype=torch.bfloat16, device="cuda") for _ in ws]
        nbytes = (n * k + m * k + m * n) * 2
        ref = F.linear(x, ws[0]).float()
        cublas = graph_ms(
            [lambda w=w, o=o, x=x: torch.mm(x, w.t(), out=o) for w, o in zip(ws, outs, strict=True)]
        )
        row: dict[str, Any] = {
            "shape": name, "rows": m, "n": n, "k": k, "bytes": nbytes,
            "cublas_us": cublas / len(ws) * 1e3, "variants": [],
        }  # fmt: skip
        for config in configs(m, n, k, sms):
            if time.monotonic() - started > args.budget_s:
                break
            try:
                got = skinny_linear(x, ws[0], config=config).float()
                err = float((got - ref).norm() / ref.norm())
                if err > 1e-2:
                    row["variants"].append({"config": vars(config), "error": f"rel err {err:.1e}"})
                    continue
                ms = graph_ms([lambda w=w, o=o, x=x, c=config: skinny_linear(x, w, out=o, config=c)
                               for w, o in zip(ws, outs, strict=True)])  # fmt: skip
            except (triton.runtime.errors.OutOfResources, RuntimeError) as exc:
                row["variants"].append({"config": vars(config), "error": str(exc)[:120]})
                continue
            row["variants"].append({"config": vars(config), "us": ms / len(ws) * 1e3, "err": err})
        timed = [v for v in row["variants"] if "us" in v]
        if timed:
            top = min(timed, key=lambda v: v["us"])
            row["best"] = top
            best[(name, m)] = SkinnyConfig(**top["config"])
            print(f"{name:8} M={m:4}: cuBLAS {row['cublas_us']:8.1f} us "
                  f"({nbytes / row['cublas_us'] / 1e6 / read:.0%} of read), skinny "
                  f"{top['us']:8.1f} us ({nbytes / top['us'] / 1e6 / read:.0%}) "
                  f"{top['config']}", flush=True)  # fmt: skip
        results.append(row)
    model = model_order(weights, rows, best)
    report = {
        "gpu": dev.name, "sms": sms, "read_bytes_per_s": read, "bandwidth": bw,
        "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "shapes": results, "model": model,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    tag = dev.name.lower().replace("nvidia ", "").replace(" ", "-")
    (args.out / f"linears-{tag}.json").write_text(json.dumps(report, indent=1))
    text = render(report)
    (args.out / f"linears-{tag}.md").write_text(text)
    print(text)


def model_order(
    weights: dict[str, list[torch.Tensor]],
    rows: list[int],
    best: dict[tuple[str, int], SkinnyConfig],
) -> list[dict[str, Any]]:
    """Every layer's linears in model order (QKV, O, gate/up, down), as a step runs them."""
    layer_shapes = [s for s in ("qkv", "o", "gate_up", "down") if s in weights]
    out = []
    for m in rows:
        if any((s, m) not in best for s in layer_shapes):
            continue
        xs = {s: torch.randn(m, weights[s][0].shape[1], dtype=torch.bfloat16, device="cuda")
              for s in layer_shapes}  # fmt: skip
        calls_cublas, calls_skinny = [], []
        nbytes = 0
        for layer in range(len(weights[layer_shapes[0]])):
            for s in layer_shapes:
                w, x = weights[s][layer], xs[s]
                nbytes += (w.numel() + x.numel() + m * w.shape[0]) * 2
                calls_cublas.append(lambda w=w, x=x: F.linear(x, w))
                calls_skinny.append(lambda w=w, x=x, c=best[(s, m)]: skinny_linear(x, w, config=c))
        cublas, skinny = graph_ms(calls_cublas), graph_ms(calls_skinny)
        out.append({"rows": m, "bytes": nbytes, "cublas_ms": cublas, "skinny_ms": skinny})
    return out


def render(r: dict[str, Any]) -> str:
    read = r["read_bytes_per_s"]
    lines = [
        f"# Decode linears: cuBLAS vs the skinny kernel, {r['gpu']}",
        "",
        f"{r['date']}; torch {r['torch']}, triton {r['triton']}, {r['sms']} SMs; read rate "
        f"measured in this run {read / 1e12:.2f} TB/s. Llama-3-8B shapes, bf16, weights "
        "streamed from HBM (one copy per layer in a CUDA graph).",
        "",
        "| linear | N x K | rows | cuBLAS (us) | of read | skinny best (us) | of read | "
        "speed-up | best launch (block_n, block_k, split, stages, warps) | variants |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for s in r["shapes"]:
        b = s.get("best")
        frac = lambda us, s=s: f"{s['bytes'] / us / 1e6 / read:.0%}"  # noqa: E731
        if b is None:
            lines.append(f"| {s['shape']} | {s['n']} x {s['k']} | {s['rows']} | "
                         f"{s['cublas_us']:.1f} | {frac(s['cublas_us'])} | n/a | | | | 0 |")  # fmt: skip
            continue
        c = b["config"]
        launch = (
            f"{c['block_n']}, {c['block_k']}, {c['split_k']}, {c['num_stages']}, {c['num_warps']}"
        )
        lines.append(
            f"| {s['shape']} | {s['n']} x {s['k']} | {s['rows']} | {s['cublas_us']:.1f} | "
            f"{frac(s['cublas_us'])} | {b['us']:.1f} | {frac(b['us'])} | "
            f"{s['cublas_us'] / b['us']:.2f}x | {launch} | {len(s['variants'])} |"
        )
    if r["model"]:
        lines += [
            "",
            "Every layer's linears in model order (QKV, O, gate/up, down x 32), one graph:",
            "",
            "| rows | cuBLAS (ms) | of read | skinny, best per shape (ms) | of read | speed-up |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for m in r["model"]:
            f = lambda ms, m=m: f"{m['bytes'] / ms / 1e9 / read:.0%}"  # noqa: E731
            lines.append(
                f"| {m['rows']} | {m['cublas_ms']:.3f} | {f(m['cublas_ms'])} | "
                f"{m['skinny_ms']:.3f} | {f(m['skinny_ms'])} | "
                f"{m['cublas_ms'] / m['skinny_ms']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
