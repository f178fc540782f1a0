"""Co-location benchmark: several ``berth serve`` processes on one GPU, each inside its share.

(b) ``halves``: two copies of one model, each given half of the GPU as its budget
(``--gpu-memory-request = --gpu-memory-limit = free/2``), loaded together at each concurrency
level, against one copy given the whole GPU under twice the load; combined output throughput
and p50 end-to-end latency. While both halves serve, the device memory of every GPU process is
read from outside the runtimes (NVML, from this process, which holds no CUDA context): each
must stay within its share and their sum within the card.

(a) three models of different sizes with fixed fractions vs request/limit pairs needs the node
agent to arbitrate bursts (``berth node-agent``); it runs only with ``--agent-socket``.

Requests as in ``serve.py`` (random prompt ids, ``ignore_eos``, streamed, locust closed loop).
Run on the GPU machine after installing ``serve_wheels.sh``'s wheels::

    python benchmarks/colocate.py --shape llama-3-8b --model-cache /tmp/berth-models \\
        --out $OUT/colocate-h200.md
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import serve  # noqa: E402  (benchmarks/serve.py: the server launcher and the locust load)

from berth.runtime.engine import nvml  # noqa: E402

GIB = 1 << 30


class MemoryWatch:
    """Samples every GPU process's memory (NVML) every ``period`` s; keeps the maxima."""

    def __init__(self, period: float = 0.5) -> None:
        self.period = period
        self.peak_per_pid: dict[int, int] = {}
        self.peak_device_used = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            for pid, used in nvml.all_process_bytes().items():
                self.peak_per_pid[pid] = max(self.peak_per_pid.get(pid, 0), used)
            mem = nvml.device_memory()
            if mem is not None:
                self.peak_device_used = max(self.peak_device_used, mem[1])

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _load_all(args: argparse.Namespace, urls: list[str], users: int, vocab: int) -> list[dict]:
    """The same closed-loop load on every server at once; one result per server."""

    def one(url: str) -> dict:
        extra = ["--url", url, "--users", str(users), "--vocab-size", str(vocab)]
        return serve._child("_load", args, extra, args.load_site)

    with concurrent.futures.ThreadPoolExecutor(len(urls)) as pool:
        return list(pool.map(one, urls))


def _serve_flags(args: argparse.Namespace, share: int | None) -> list[str]:
    flags = ["--max-num-seqs", str(args.max_num_seqs), "--log-level", "info"]
    if share is not None:
        flags += ["--gpu-memory-request", str(share), "--gpu-memory-limit", str(share)]
    return flags


def halves_vs_whole(args: argparse.Namespace, tmp: Path, vocab: int) -> tuple[list[dict], dict]:
    mem = nvml.device_memory()
    assert mem is not None, "NVML cannot read the device"
    total, used0, free0 = mem
    share = int(free0 - args.margin_gib * GIB) // 2
    levels = [int(c) for c in args.concurrency.split(",")]
    rows: list[dict] = []
    memory: dict = {"capacity": total, "used_before": used0, "share": share}
    with contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        urls = [
            stack.enter_context(
                serve.berth_serve(args, tmp / f"half{i}.log", _serve_flags(args, share))
            )
            for i in range(2)
        ]
        memory["start_s"] = time.perf_counter() - t0
        with MemoryWatch() as watch:
            for users in levels:
                print(f"halves: {users} streams each ...", flush=True)
                runs = _load_all(args, urls, users, vocab)
                rows.append({"mode": "2 x 0.5", "users": users, "runs": runs})
        memory["per_process"] = dict(watch.peak_per_pid)
        memory["device_used_peak"] = watch.peak_device_used
    memory["startup"] = [_memory_line(tmp / f"half{i}.log") for i in range(2)]
    with serve.berth_serve(args, tmp / "whole.log", _serve_flags(args, None)) as url:
        for users in levels:
            print(f"whole: {2 * users} streams ...", flush=True)
            runs = _load_all(args, [url], 2 * users, vocab)
            rows.append({"mode": "1 x 1.0", "users": 2 * users, "runs": runs})
    return rows, memory


def _memory_line(log: Path) -> str:
    """The runtime's own start-up measurement (weights, workspace, KV chunks) from its log."""
    lines = [line for line in log.read_text().splitlines() if "memory: weights" in line]
    return lines[-1].split("memory: ", 1)[1] if lines else "(not logged)"


def report(args: argparse.Namespace, gpu: str, rows: list[dict], memory: dict) -> str:
    lines = [
        f"# Co-location on {gpu}",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; model `{args.shape}` (random weights, bf16); "
        f"{args.prompt_tokens} prompt + {args.output_tokens} output tokens per request (random "
        f"ids, ignore_eos, streamed); locust closed loop, {args.warmup:g} s warm-up, "
        f"{args.duration:g} s measured per level; max_num_seqs {args.max_num_seqs}.",
        "",
        "## (b) two copies at 0.5 of the GPU each vs one copy at 1.0",
        "",
        "| layout | streams in all | output tok/s (sum) | E2E p50 (s) | TTFT p50 (ms) | failures |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    by_users: dict[tuple[str, int], float] = {}
    for row in rows:
        runs = row["runs"]
        tput = sum(r["output_tokens_per_s"] for r in runs)
        e2e = max(r["e2e_s_p50"] for r in runs)
        ttft = max(r["ttft_ms"]["50"] for r in runs)
        fails = sum(r["failures"] for r in runs)
        streams = row["users"] * len(runs)
        by_users[(row["mode"], streams)] = tput
        lines.append(
            f"| {row['mode']} | {streams} | {tput:.0f} | {e2e:.2f} | {ttft:.0f} | {fails} |"
        )
    lines.append("")
    for (mode, streams), tput in by_users.items():
        if mode == "2 x 0.5" and ("1 x 1.0", streams) in by_users:
            whole = by_users[("1 x 1.0", streams)]
            lines.append(
                f"- {streams} streams: two halves give {tput / whole * 100:.0f}% of one whole "
                f"GPU's throughput (target >= 92%; Run:ai's published figure 77%)."
            )
    share, total = memory["share"], memory["capacity"]
    per = memory["per_process"]
    lines += [
        "",
        "## Memory, read from outside the runtimes (NVML, peak over the load)",
        "",
        f"Card {total / GIB:.1f} GiB, {memory['used_before'] / GIB:.2f} GiB in use before; each "
        f"runtime's share {share / GIB:.2f} GiB; both started and turned ready in "
        f"{memory['start_s']:.0f} s.",
        "",
        "| process | peak device memory (GiB) | within its share |",
        "| ---: | ---: | --- |",
    ]
    for pid, used in sorted(per.items()):
        lines.append(f"| {pid} | {used / GIB:.2f} | {'yes' if used <= share else 'NO'} |")
    lines += ["", "Each runtime's own start-up measurement (its log):", ""]
    lines += [f"- {line}" for line in memory["startup"]]
    lines += [
        "",
        f"Sum of the runtimes: {sum(per.values()) / GIB:.2f} GiB; device in use at peak "
        f"{memory['device_used_peak'] / GIB:.2f} GiB of {total / GIB:.1f} GiB.",
        "",
    ]
    if args.note:
        lines += [args.note, ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--model-cache", help="where to make (or find) the test model")
    parser.add_argument("--concurrency", default="8,32", help="streams per half")
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--margin-gib", type=float, default=1.0, help="left free on the card")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--load-site", help="extra sys.path entry where locust is installed")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", help="results file")
    args = parser.parse_args()
    args.device = "cuda"
    from berth.runtime.engine.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory(prefix="berth-colocate-") as tmp:
        target = Path(args.model_cache or tmp) / args.shape
        if not (target / "config.json").exists():
            print(f"making the random-weight {args.shape} model in {target} ...", flush=True)
            # In a child process: this one must hold no CUDA context while it measures.
            code = (
                "import sys; from berth.runtime.engine.testmodels import make_model; "
                "make_model(sys.argv[1], sys.argv[2], dtype='bfloat16', device='cuda')"
            )
            subprocess.run([sys.executable, "-c", code, args.shape, str(target)], check=True)
        args.model_dir = str(target)
        vocab = Tokenizer(args.model_dir).vocab_size
        rows, memory = halves_vs_whole(args, Path(tmp), vocab)
    import torch

    text = report(args, torch.cuda.get_device_name(0), rows, memory)
    out = Path(args.out or ROOT / "benchmarks" / "results" / "colocate-h200.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
