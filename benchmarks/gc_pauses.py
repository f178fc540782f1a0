"""Garbage-collector pauses of ``berth serve`` under streaming load, with and without the
start-up heap frozen (``runtime/server/heap.py``).

For each mode a real ``berth serve`` (tiny model, CPU by default) runs in a child process that
logs every generation-1 and generation-2 collection of its own and of its engine process
(``gc.callbacks``: generation, duration, process), while ``--streams`` closed-loop streaming
completions run against it for ``--duration`` seconds. The unfrozen mode replaces the freeze
with a no-op in both processes. Prints a table; ``--out`` writes it as Markdown.

    PYTHONPATH=. python benchmarks/gc_pauses.py --out benchmarks/results/gc-pauses-cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
GC_LOG, UNFROZEN = "BERTH_BENCH_GC_LOG", "BERTH_BENCH_UNFROZEN"


def _instrument() -> None:
    """In a serving process (and, through the spawn start method, its engine process): log
    collections of generation >= 1, and with UNFROZEN make the freeze a no-op."""
    path = os.environ.get(GC_LOG)
    if not path:
        return
    sink = open(path, "a", buffering=1)  # noqa: SIM115  (lives as long as the process)
    started = [0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        elif info["generation"] >= 1:
            ms = (time.perf_counter() - started[0]) * 1e3
            sink.write(json.dumps({"pid": os.getpid(), "gen": info["generation"], "ms": ms}) + "\n")

    gc.callbacks.append(on_gc)
    if os.environ.get(UNFROZEN):
        from berth.runtime.server import heap

        heap.freeze_startup_heap = lambda process: 0  # type: ignore[assignment]


def _stream(url: str, stop: float, seed: int, gaps: list[float], done: list[int]) -> None:
    """Closed-loop streamed completions until ``stop``; records the gaps between chunks."""
    body = {"model": "tiny", "max_tokens": 32, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as client:
        n = 0
        while time.time() < stop:
            prompt = [(seed * 7919 + n * 31 + i) % 1000 for i in range(16)]
            last = None
            with client.stream(
                "POST", f"{url}/v1/completions", json={**body, "prompt": prompt}
            ) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        now = time.perf_counter()
                        if last is not None:
                            gaps.append(now - last)
                        last = now
            n += 1
        done.append(n)


def run_mode(frozen: bool, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    log_path = work / f"gc-{'frozen' if frozen else 'unfrozen'}.jsonl"
    log_path.unlink(missing_ok=True)
    env = {**os.environ, GC_LOG: str(log_path), "PYTHONPATH": str(ROOT)}
    if not frozen:
        env[UNFROZEN] = "1"
    serve = ["berth", "serve", "--model", "tiny", "--device", args.device, "--port",
             str(args.port), "--host", "127.0.0.1", "--no-access-log", "--log-level", "warning"]  # fmt: skip
    server = subprocess.Popen([sys.executable, __file__, "--serve", json.dumps(serve)], env=env)
    url = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError("berth serve did not become ready")
            time.sleep(0.5)
        before = log_path.stat().st_size if log_path.exists() else 0
        stop = time.time() + args.duration
        gaps: list[float] = []
        done: list[int] = []
        threads = [threading.Thread(target=_stream, args=(url, stop, i, gaps, done))
                   for i in range(args.streams)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    with log_path.open() as f:
        f.seek(before)
        rows = [json.loads(line) for line in f if line.strip()]
    server_rows = [r for r in rows if r["pid"] == server.pid]
    engine_rows = [r for r in rows if r["pid"] != server.pid]
    gaps.sort()
    return {
        "frozen": frozen,
        "requests": sum(done),
        "server": _pauses(server_rows),
        "engine": _pauses(engine_rows),
        "gap_p50_ms": 1e3 * statistics.median(gaps),
        "gap_p999_ms": 1e3 * gaps[int(0.999 * len(gaps))],
        "gap_max_ms": 1e3 * gaps[-1],
    }


def _pauses(rows: list[dict[str, Any]]) -> dict[str, Any]:
    full = sorted(r["ms"] for r in rows if r["gen"] == 2)
    return {
        "full": len(full),
        "full_max_ms": full[-1] if full else 0.0,
        "full_median_ms": statistics.median(full) if full else 0.0,
        "gen1": sum(1 for r in rows if r["gen"] == 1),
    }


def full_pass_after_load(device: str) -> dict[str, float]:
    """In this process: load the tiny model's engine (as the engine process does), then time a
    full collection, then one after freezing the heap."""
    from berth.runtime.engine import Engine, EngineConfig
    from berth.runtime.engine.testmodels import make_model

    model = make_model("tiny", Path("/tmp/berth-gc-pauses/tiny"))
    engine = Engine(EngineConfig(model=str(model), device=device, num_kv_blocks=64))
    gc.collect()
    objects = len(gc.get_objects())
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        gc.collect()
        times.append(time.perf_counter() - t0)
    gc.freeze()
    t0 = time.perf_counter()
    gc.collect()
    frozen = time.perf_counter() - t0
    gc.unfreeze()
    del engine
    return {"objects": objects, "full_ms": 1e3 * min(times), "frozen_ms": 1e3 * frozen}


def report(
    results: list[dict[str, Any]], after_load: dict[str, float], args: argparse.Namespace
) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Garbage-collector pauses of `berth serve` under streaming load",
        "",
        f"{when}; {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"model `tiny` on {args.device}; {args.streams} closed-loop streams of 16-token prompts "
        f"and 32 streamed tokens, {args.duration:.0f} s per mode; `benchmarks/gc_pauses.py`.",
        "",
        "| start-up heap | requests | server: full collections | longest / median (ms) "
        "| engine process: full collections | longest (ms) | chunk gap p50 / p99.9 / max (ms) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        s, e = r["server"], r["engine"]
        lines.append(
            f"| {'frozen' if r['frozen'] else 'not frozen'} | {r['requests']} | {s['full']} | "
            f"{s['full_max_ms']:.1f} / {s['full_median_ms']:.1f} | {e['full']} | "
            f"{e['full_max_ms']:.1f} | {r['gap_p50_ms']:.2f} / {r['gap_p999_ms']:.1f} / "
            f"{r['gap_max_ms']:.1f} |"
        )
    lines += [
        "",
        f"A full collection in a process that has just loaded the engine ({after_load['objects']:,} "
        f"tracked objects): {after_load['full_ms']:.1f} ms; with the heap frozen: "
        f"{after_load['frozen_ms']:.2f} ms.",
        "",
        "A full (generation 2) collection stops its process: in the server process no stream "
        "gets a chunk meanwhile, in the engine process no step runs. Chunk gaps are measured "
        "by the clients (every stream, every chunk after the first).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--port", type=int, default=8017)
    parser.add_argument("--work", type=Path, default=Path("/tmp/berth-gc-pauses"))
    parser.add_argument("--out", type=Path, help="write the table as Markdown here")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # internal: run berth serve here
    args = parser.parse_args()
    if args.serve:
        sys.argv = json.loads(args.serve)
        from berth.cli import main as berth_main

        berth_main()
        return
    args.work.mkdir(parents=True, exist_ok=True)
    results = [run_mode(frozen, args, args.work) for frozen in (False, True)]
    text = report(results, full_pass_after_load(args.device), args)
    print(text)
    if args.out:
        args.out.write_text(text)


_instrument()  # module level: the engine process re-imports this file (spawn), then logs too

if __name__ == "__main__":
    main()
