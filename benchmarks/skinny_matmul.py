"""A decode step's linears at 1-16 rows: the Triton skinny kernel (``kernels/skinny_matmul.py``)
against cuBLAS and cuBLASLt, per kind of linear, on one GPU, against the read rate of the run.

Each kind (QKV, O, gate/up, down of a model shape) runs as one CUDA graph of its linears, one
per layer, each with its own weight, so every weight streams from HBM as in a step; the kernels
follow each other as the step's do, the Triton ones as programmatic dependents. The timing is
the engine's own start-up measurement (``blas_choice.time_matmuls``). Reported: the
median replay over the linears, the weights' read rate it implies as a fraction of the measured
read rate, and the fastest Triton launch config of a small grid. Results are checked against
``F.linear`` first.

    PYTHONPATH=. python benchmarks/skinny_matmul.py --out $OUT        # on the GPU machine
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))

from blas_tuning import linear_shapes  # benchmarks/blas_tuning.py
from engine import measure_bandwidth  # benchmarks/engine.py

from berth.kernels.skinny_matmul import SkinnyConfig, skinny_matmul
from berth.runtime.engine.blas_choice import preferred, time_matmuls


def configs(sweep: bool) -> list[SkinnyConfig]:
    if not sweep:
        return [SkinnyConfig()]
    grid = []
    for block_n in (16, 32, 64):
        for block_k in (128, 256):
            for stages in (3, 4):
                grid.append(SkinnyConfig(block_n, block_k, 4, stages))
    return grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3-8b")
    ap.add_argument("--rows", default="1,8,16")
    ap.add_argument("--sweep", action="store_true", help="a grid of Triton launch configs")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    dtype, device = torch.bfloat16, torch.device("cuda")
    read = measure_bandwidth()["read"]
    results: list[dict[str, Any]] = []
    for kind, (n, k, count) in linear_shapes(args.shape).items():
        if kind == "lm_head":
            continue
        weights = [torch.randn(n, k, dtype=dtype, device=device) * 0.02 for _ in range(count)]
        nbytes = n * k * 2
        for rows in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(rows, k, dtype=dtype, device=device)
            ref = F.linear(x, weights[0])
            row: dict[str, Any] = {"kind": kind, "rows": rows, "n": n, "k": k, "count": count}
            for library in ("cublas", "cublaslt"):
                with preferred(library):
                    ms = time_matmuls(weights, rows, replays=7)
                row[library] = ms / count * 1e3  # us per linear
            best: tuple[float, str] | None = None
            for config in configs(args.sweep):
                out = skinny_matmul(x, weights[0], config=config)
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                if not err < 1e-2:
                    print(f"FAIL {kind} {rows} {config}: rel err {err:.1e}", flush=True)
                    continue
                skinny = functools.partial(skinny_matmul, config=config)
                ms = time_matmuls(weights, rows, replays=7, matmul=skinny)
                us = ms / count * 1e3
                if config == SkinnyConfig():
                    row["triton_default"] = us
                if best is None or us < best[0]:
                    best = (us, str(config))
            assert best is not None
            row["triton_best"], row["triton_best_config"] = best
            for key in ("cublas", "cublaslt", "triton_default", "triton_best"):
                if key in row:
                    row[f"{key}_of_read"] = nbytes / (row[key] * 1e-6) / read
            results.append(row)
            print(
                f"{kind:8s} rows {rows:3d}: cublas {row['cublas']:.1f} us "
                f"({row['cublas_of_read']:.0%}), cublaslt {row['cublaslt']:.1f} "
                f"({row['cublaslt_of_read']:.0%}), triton {row.get('triton_default', 0):.1f} "
                f"best {best[0]:.1f} ({row['triton_best_of_read']:.0%}) {best[1]}",
                flush=True,
            )
        del weights
        torch.cuda.empty_cache()
    report = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        "read_bytes_per_s": read,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "skinny-matmul.json").write_text(json.dumps(report, indent=1))
    table = render(report)
    print(table)
    (args.out / "skinny-matmul.md").write_text(table)


def render(report: dict[str, Any]) -> str:
    """The results as a Markdown table: per kind and row count, each kernel's time per linear
    and its share of the read rate, and the skinny kernel's speed-up over cuBLAS."""
    lines = [
        f"# A decode step's linears at few rows on {report['gpu']}",
        "",
        f"{report['date']}; torch {report['torch']}, triton {report['triton']}, CUDA "
        f"{report['cuda']}; HBM read measured in this run {report['read_bytes_per_s'] / 1e12:.2f}"
        " TB/s. Times per linear (one graph of a kind's linears, one per layer).",
        "",
        "| kind (N x K) | rows | cuBLAS (us) | of read | cuBLASLt (us) | of read | skinny, best "
        "(us) | of read | best config | vs cuBLAS |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['kind']} ({r['n']} x {r['k']}) | {r['rows']} | {r['cublas']:.1f} | "
            f"{r['cublas_of_read']:.0%} | {r['cublaslt']:.1f} | {r['cublaslt_of_read']:.0%} | "
            f"{r['triton_best']:.1f} | {r['triton_best_of_read']:.0%} | "
            f"{r['triton_best_config']} | {r['cublas'] / r['triton_best']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
