"""A decode step's linears under cuBLAS's default pick, cuBLASLt's, and PyTorch TunableOp's
timed pick among cuBLASLt's candidates, on one GPU, against the HBM read rate of the same run.

Why: the decode step is 1.12-1.13x its floor, and the floor is cuBLAS running the step's
linears at 86-88 % of the read rate (``engine-targets-h100-20261206.md``). cuBLAS picks each
GEMM's kernel by a heuristic; TunableOp (``torch.cuda.tunable``, CUDA cuBLASLt candidates since
PyTorch 2.10) times up to N of cuBLASLt's candidates for each shape and keeps the fastest.
This measures what that buys before the engine uses it.

Every variant runs the same graph: a llama-3-8b-shaped step's linears (QKV, O, gate/up and down
of 32 layers, then the LM head), each with its own weight, so nothing is served from L2, at
1, 16, 64, 128 and 256 rows. Reported: the median replay (ms), the weights' read rate it
implies, as a fraction of the measured read rate, and the same per kind of linear.

    PYTHONPATH=. python benchmarks/blas_tuning.py --out $OUT        # on the GPU machine
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import measure_bandwidth  # benchmarks/engine.py

from berth.runtime.engine.blas_choice import preferred, time_matmuls
from berth.runtime.engine.testmodels import SHAPES


def linear_shapes(shape: str) -> dict[str, tuple[int, int, int]]:
    """Kind -> (out_features, in_features, count per step) of a model shape's linears."""
    s = SHAPES[shape]
    assert s.vocab_size is not None, f"{shape}: a GPU shape with a fixed vocabulary"

    qkv = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
    return {
        "qkv": (qkv, s.hidden_size, s.num_layers),
        "o": (s.hidden_size, s.num_heads * s.head_dim, s.num_layers),
        "gate_up": (2 * s.intermediate_size, s.hidden_size, s.num_layers),
        "down": (s.hidden_size, s.intermediate_size, s.num_layers),
        "lm_head": (s.vocab_size, s.hidden_size, 1),
    }


@contextlib.contextmanager
def blas_variant(name: str, algo_count: int, picks: list[Any]) -> Iterator[None]:
    """cuBLAS (the default), cuBLASLt preferred, or TunableOp timing cuBLASLt's candidates
    (its picks appended to ``picks``: operator, shape, chosen kernel, ms)."""
    tunable, tuned = torch.cuda.tunable, name.startswith("tuned")
    with preferred("cublaslt" if name in ("cublaslt", "tuned-lt") else "cublas"):
        if tuned:
            tunable.enable(True)
            tunable.tuning_enable(True)
            if hasattr(tunable, "set_cublaslt_requested_algo_count"):  # PyTorch 2.11+
                tunable.set_cublaslt_requested_algo_count(algo_count)
            tunable.set_rotating_buffer_size(1024)  # MB: larger than L2, as in a real step
            tunable.set_max_tuning_duration(30)
            tunable.set_max_tuning_iterations(100)
            if hasattr(tunable, "_clear_all"):
                tunable._clear_all()  # each tuned variant tunes from scratch
        try:
            yield
        finally:
            if tuned:
                results: Any = tunable.get_results()  # typed as one tuple; a list of them
                picks.extend([str(f) for f in r] for r in results)
                tunable.tuning_enable(False)
                tunable.enable(False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3-8b")
    ap.add_argument("--rows", default="1,16,64,128,256")
    ap.add_argument("--variants", default="cublas,cublaslt,tuned,tuned-lt")
    ap.add_argument("--algo-count", type=int, default=32, help="cuBLASLt candidates to time")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bw = measure_bandwidth()
    dev = torch.cuda.get_device_name()
    print(f"{dev}: HBM read {bw['read'] / 1e12:.2f} TB/s", flush=True)
    kinds = linear_shapes(args.shape)
    weights = {
        kind: [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(c)]
        for kind, (n, k, c) in kinds.items()
    }
    rows_list = [int(r) for r in args.rows.split(",")]
    gpu = dev.replace("NVIDIA ", "").split()[0].lower()
    report: dict[str, Any] = {
        "gpu": dev,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cublaslt_candidates": args.algo_count,
        "shape": args.shape,
        "hbm_read_bytes_per_s": bw["read"],
        "runs": [],
    }
    for variant in args.variants.split(","):
        picks: list[Any] = []
        with blas_variant(variant, args.algo_count, picks):
            for rows in rows_list:
                per_kind = {
                    kind: time_matmuls(ws, rows, replays=15) for kind, ws in weights.items()
                }
                in_order = [weights[kind][layer] for layer in range(kinds["qkv"][2])
                            for kind in ("qkv", "o", "gate_up", "down")]  # fmt: skip
                ms = time_matmuls([*in_order, weights["lm_head"][0]], rows, replays=15)
                nbytes = sum(w.numel() * 2 for ws in weights.values() for w in ws)
                run = {
                    "variant": variant,
                    "rows": rows,
                    "step_ms": ms,
                    "of_read": nbytes / (ms * 1e-3) / bw["read"],
                    "kinds": {
                        kind: {
                            "ms": t,
                            "of_read": sum(w.numel() * 2 for w in weights[kind])
                            / (t * 1e-3)
                            / bw["read"],
                        }
                        for kind, t in per_kind.items()
                    },
                }
                report["runs"].append(run)
                kinds_txt = " ".join(f"{k} {v['of_read']:.0%}" for k, v in run["kinds"].items())
                print(f"{variant:9s} rows {rows:4d}: step linears {ms:.3f} ms, "
                      f"{run['of_read']:.1%} of read | {kinds_txt}", flush=True)  # fmt: skip
                (out / f"blas-tuning-{gpu}.json").write_text(json.dumps(report, indent=2))
        report.setdefault("picks", {})[variant] = picks
    (out / f"blas-tuning-{gpu}.json").write_text(json.dumps(report, indent=2))
    (out / f"blas-tuning-{gpu}.md").write_text(render(report))
    print(render(report))


def render(report: dict[str, Any]) -> str:
    base = {r["rows"]: r["step_ms"] for r in report["runs"] if r["variant"] == "cublas"}
    lines = [
        f"# A decode step's linears by BLAS pick: {report['shape']} on {report['gpu']}",
        "",
        f"torch {report['torch']}, CUDA {report['cuda']}; HBM read measured in this run "
        f"{report['hbm_read_bytes_per_s'] / 1e12:.2f} TB/s."
        + (
            f" TunableOp timed up to {report['cublaslt_candidates']} cuBLASLt candidates per "
            "shape (rotating buffer 1 GB); its picks are in the JSON."
            if any(r["variant"].startswith("tuned") for r in report["runs"])
            else ""
        ),
        "",
        "| variant | rows | step linears (ms) | vs cuBLAS | of read | qkv | o | gate_up | down | lm_head |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["runs"]:
        k = r["kinds"]
        speed = base.get(r["rows"], r["step_ms"]) / r["step_ms"]
        cells = " | ".join(
            f"{k[n]['of_read']:.0%}" for n in ("qkv", "o", "gate_up", "down", "lm_head")
        )
        lines.append(f"| {r['variant']} | {r['rows']} | {r['step_ms']:.3f} | {speed:.3f}x | "
                     f"{r['of_read']:.1%} | {cells} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
