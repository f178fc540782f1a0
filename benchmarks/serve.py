"""Serving benchmark: ``berth serve`` under a locust load at rising concurrency, against the
engine's own throughput measured in the same run.

Every request is a completion of ``--prompt-tokens`` random token ids (distinct per request,
so the prefix cache does not flatter anyone) that generates exactly ``--output-tokens`` tokens
(``ignore_eos``), streamed. Each locust user is one closed-loop stream: it sends the next
request as soon as the last one ends, so ``users`` is the number of concurrent streams.

Metrics, as aiperf defines them: TTFT is send to first chunk; ITL per request is
(last chunk - first chunk) / (output tokens - 1); throughput is output tokens delivered inside
the measurement window (after a warm-up) per second. The engine baseline drives
``Engine.step()`` in a closed loop with the same concurrency and request shape, in a process of
its own; the server's overhead is 1 - server throughput / engine throughput at the top
concurrency (target: at most 5%). The server runs its engine in a process of its own too
(``berth.runtime.server.engine_process``), so HTTP work and the engine's host work do not
share a GIL.

On the GPU machine (no fastapi/uvicorn/pydantic/locust there, and no network) install the
wheels that ``benchmarks/serve_wheels.sh`` downloads, then run::

    python -m pip install --no-index --find-links benchmarks/wheels \
        fastapi uvicorn pydantic click pyyaml locust
    python benchmarks/serve.py --shape llama-3-8b --model-cache /tmp/berth-models \
        --out $OUT/serve-h100.md

Locally, with the tiny model on the CPU (locust in a side directory, not the project venv)::

    python benchmarks/serve.py --model tiny --device cpu --concurrency 1,4 --duration 10 \
        --warmup 3 --prompt-tokens 32 --output-tokens 32 --load-site /tmp/locust-site
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def prompt_ids(vocab_size: int, length: int, seed: int, index: int) -> list[int]:
    """Request ``index``'s prompt: random ids, identical in the engine and the server runs."""
    rng = random.Random(seed * 1_000_003 + index)
    return [rng.randrange(16, vocab_size) for _ in range(length)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# ---- the engine baseline (its own process: torch, no HTTP) ------------------------------------


def engine_baseline(args: argparse.Namespace) -> dict[str, float]:
    """Closed loop of ``--users`` streams on ``Engine.step()``; output tokens/s in the window."""
    from berth.runtime.engine import Engine, EngineConfig, SamplingParams
    from berth.runtime.server.engine_process import share_cpu_with_event_loop

    share_cpu_with_event_loop(args.device)  # the same threads as the server's engine gets
    engine = Engine(EngineConfig(model=args.model_dir, device=args.device))
    vocab = engine.tokenizer.vocab_size
    params = SamplingParams(max_tokens=args.output_tokens, ignore_eos=True)
    issued = 0

    def add() -> None:
        nonlocal issued
        ids = prompt_ids(vocab, args.prompt_tokens, args.seed, issued)
        engine.add_request(f"bench-{issued}", ids, params)
        issued += 1

    for _ in range(args.users):
        add()
    start = time.monotonic()
    window_start, window_end = start + args.warmup, start + args.warmup + args.duration
    tokens = 0
    while True:
        outputs = engine.step()
        now = time.monotonic()
        if now >= window_end:
            break
        for output in outputs:
            if now >= window_start:
                tokens += len(output.new_token_ids)
            if output.finished:
                add()
    return {"output_tokens_per_s": tokens / args.duration, "requests_issued": issued}


# ---- the load generator (its own process: locust monkey-patches with gevent) -------------------


@dataclass
class StreamRecord:
    """One streamed request: when it was sent, when each chunk came, the tokens in all."""

    sent: float
    arrivals: list[float] = field(default_factory=list)
    tokens: int = 0  # from the final usage chunk
    done: bool = False  # still streaming when the load stopped


def locust_load(args: argparse.Namespace) -> dict[str, object]:
    """``--users`` locust users streaming completions from ``--url`` for warm-up + duration."""
    import gevent
    from locust import FastHttpUser, constant, task
    from locust.env import Environment

    records: list[StreamRecord] = []  # appended at the send: unfinished streams count too
    failures: list[str] = []
    counter = iter(range(10**9))

    class Stream(FastHttpUser):
        host = args.url
        wait_time = constant(0)
        network_timeout = 600.0
        connection_timeout = 60.0

        @task
        def complete(self) -> None:
            ids = prompt_ids(args.vocab_size, args.prompt_tokens, args.seed, next(counter))
            body = {"model": args.model_name, "prompt": ids, "max_tokens": args.output_tokens,
                    "ignore_eos": True, "stream": True, "temperature": 1.0,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            record = StreamRecord(time.perf_counter())
            records.append(record)
            with self.client.post(
                "/v1/completions", json=body, stream=True, catch_response=True, name="stream"
            ) as response:
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text}")
                    response.failure(f"status {response.status_code}")
                    return
                stream = response.stream
                while line := stream.readline(b"\n"):
                    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("choices"):
                        record.arrivals.append(time.perf_counter())
                    if chunk.get("usage"):
                        record.tokens = chunk["usage"]["completion_tokens"]
                response.success()
            record.done = True

    env = Environment(user_classes=[Stream])
    runner = env.create_local_runner()
    started = time.perf_counter()
    runner.start(args.users, spawn_rate=args.users)
    gevent.sleep(args.warmup + args.duration)
    runner.quit()
    window_start = started + args.warmup
    window_end = window_start + args.duration
    in_window = 0.0
    ttft, itl, e2e = [], [], []
    for record in records:
        sent, arrivals = record.sent, record.arrivals
        # A stream cut off at the end counts a token a chunk (a chunk holds at least one).
        tokens = record.tokens if record.done else len(arrivals)
        if not arrivals or tokens == 0:
            continue
        share = sum(window_start <= t < window_end for t in arrivals) / len(arrivals)
        in_window += tokens * share
        if record.done and sent >= window_start and arrivals[-1] < window_end:
            ttft.append(arrivals[0] - sent)
            e2e.append(arrivals[-1] - sent)
            if tokens > 1:
                itl.append((arrivals[-1] - arrivals[0]) / (tokens - 1))
    return {
        "users": args.users,
        "requests": len(ttft),
        "failures": len(failures),
        "first_failure": failures[0] if failures else None,
        "output_tokens_per_s": in_window / args.duration,
        "ttft_ms": {q: percentile(ttft, q) * 1e3 for q in (50, 90, 99)},
        "itl_ms": {q: percentile(itl, q) * 1e3 for q in (50, 90, 99)},
        "e2e_s_p50": statistics.median(e2e) if e2e else float("nan"),
    }


# ---- orchestration ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _child(mode: str, args: argparse.Namespace, extra: list[str], site: str | None) -> dict:
    """Run this script in ``mode`` in a fresh process; its last stdout line is its JSON result."""
    env = dict(os.environ)
    paths = [str(ROOT), *([site] if site else []), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    command = [sys.executable, __file__, mode, "--model-dir", args.model_dir,
               "--prompt-tokens", str(args.prompt_tokens), "--output-tokens",
               str(args.output_tokens), "--warmup", str(args.warmup), "--duration",
               str(args.duration), "--seed", str(args.seed), *extra]  # fmt: skip
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def berth_serve(
    args: argparse.Namespace,
    log: Path,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """``berth serve`` on the model, as a pod runs it (``extra`` flags and ``env`` added);
    yields its URL; SIGTERM at the end."""
    port = _free_port()
    command = [sys.executable, "-c", "from berth.cli import main; main()", "serve",
               "--model", args.model_dir, "--served-model-name", "bench", "--host", "127.0.0.1",
               "--port", str(port), "--device", args.device, "--no-access-log",
               "--log-level", "warning", "--max-waiting-requests", "1024",
               *(extra or [])]  # fmt: skip
    paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    environment = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
    }
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=environment)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 900
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"berth serve exited:\n{log.read_text()[-3000:]}")
                with (
                    contextlib.suppress(OSError),
                    urllib.request.urlopen(f"{url}/ready", timeout=5) as ready,
                ):
                    if ready.status == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("berth serve did not become ready")
                time.sleep(1)
            yield url
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()


def device_name(device: str) -> tuple[str, str]:
    """(full name, short slug for the results file) of the device the engine runs on."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return "CPU", "cpu"
    name = torch.cuda.get_device_name(0)
    words = [w for w in name.lower().split() if w != "nvidia"]
    return name, (words[0] if words else "gpu")


def report(args: argparse.Namespace, gpu: str, engine: dict, runs: list[dict]) -> str:
    top = runs[-1]
    overhead = 1 - top["output_tokens_per_s"] / engine["output_tokens_per_s"]
    verdict = "meets" if overhead <= 0.05 else "MISSES"
    lines = [
        f"# `berth serve` on {gpu}",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; model `{args.model_label}`; "
        f"{args.prompt_tokens} prompt + {args.output_tokens} output tokens per request "
        f"(random ids, ignore_eos, streamed); locust closed loop, {args.warmup:g} s warm-up, "
        f"{args.duration:g} s measured per level.",
        "",
        "| streams | requests | output tok/s | TTFT p50 / p90 / p99 (ms) | "
        "ITL p50 / p90 / p99 (ms) | E2E p50 (s) | failures |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        t, i = run["ttft_ms"], run["itl_ms"]
        lines.append(
            f"| {run['users']} | {run['requests']} | {run['output_tokens_per_s']:.0f} | "
            f"{t['50']:.1f} / {t['90']:.1f} / {t['99']:.1f} | "
            f"{i['50']:.2f} / {i['90']:.2f} / {i['99']:.2f} | {run['e2e_s_p50']:.2f} | "
            f"{run['failures']} |"
        )
    lines += [
        "",
        f"Engine alone (`Engine.step()` closed loop, {top['users']} streams): "
        f"{engine['output_tokens_per_s']:.0f} output tok/s. Server at {top['users']} streams: "
        f"{top['output_tokens_per_s']:.0f} tok/s, overhead {overhead * 100:.1f}% "
        f"({verdict} the 5% target).",
        "",
    ]
    if args.note:
        lines += [args.note, ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "_engine", "_load"])
    parser.add_argument("--shape", default="llama-3-8b", help="test-model shape to make")
    parser.add_argument("--model", help="a model directory, or 'tiny' (default: --shape)")
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--users", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--vocab-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model-name", default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--model-cache", help="where to make (or find) the test model")
    parser.add_argument("--load-site", help="extra sys.path entry where locust is installed")
    parser.add_argument("--note", default="", help="a paragraph to add to the results file")
    parser.add_argument("--out", help="results file (default: benchmarks/results/serve-<gpu>.md)")
    args = parser.parse_args()
    if args.mode == "_engine":
        print(json.dumps(engine_baseline(args)))
        return
    if args.mode == "_load":
        print(json.dumps(locust_load(args)))
        return

    sys.path.insert(0, str(ROOT))
    from berth.runtime.engine.testmodels import make_model
    from berth.runtime.engine.tokenizer import Tokenizer

    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="berth-bench-") as tmp:
        args.model_label = args.model or args.shape
        if args.model and args.model != "tiny":
            args.model_dir = args.model
        else:
            name = "tiny" if args.model == "tiny" else args.shape
            target = Path(args.model_cache or tmp) / name
            if not (target / "config.json").exists():
                on_gpu = args.device != "cpu"
                print(f"making the random-weight {name} model in {target} ...", flush=True)
                make_model(name, target, dtype="bfloat16" if on_gpu else "float32",
                           device="cuda" if on_gpu else "cpu")  # fmt: skip
                if on_gpu:
                    import torch

                    torch.cuda.empty_cache()  # the engine runs next door and sizes its KV pool
            args.model_dir = str(target)
        vocab = Tokenizer(args.model_dir).vocab_size
        gpu, slug = device_name(args.device)
        common = ["--device", args.device]
        print(f"engine alone, {levels[-1]} streams ...", flush=True)
        engine = _child("_engine", args, [*common, "--users", str(levels[-1])], None)
        print(f"  {engine['output_tokens_per_s']:.0f} tok/s", flush=True)
        runs = []
        with berth_serve(args, Path(tmp) / "serve.log") as url:
            for users in levels:
                print(f"server, {users} streams ...", flush=True)
                extra = ["--url", url, "--users", str(users), "--vocab-size", str(vocab)]
                run = _child("_load", args, extra, args.load_site)
                print(f"  {run['output_tokens_per_s']:.0f} tok/s", flush=True)
                runs.append(run)
    text = report(args, gpu, engine, runs)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"serve-{slug}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
