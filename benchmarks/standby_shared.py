"""Warm standby with three models on one GPU that holds one at a time (issue 20).

Three ``berth serve`` runtimes of one model shape (three tenants, each with its own copy of the
weights) under a real ``berth node-agent``, each with a request (= limit) of
``--request-fraction`` of the card, so no two fit at once. Standby is on and the runtimes park
only when asked: the agent decides who is resident. Traffic takes turns, each model twice in a
row (A A B B C C A ...), ``--streams`` streamed requests per turn and ``--gap-s`` between turns:
the first turn on a model finds it parked, so its requests wait for the agent to park the model
that was serving (the least recently used idle one), for the memory to show free on the driver,
and for the wake; the second finds it resident. Reported: TTFT p50 / p99 of both kinds of turn,
every request's status (none may fail), the most tenants the agent saw holding memory at once,
and the peak of the device's used memory (NVML, from this process, which holds no CUDA
context) against the card.

    python benchmarks/standby_shared.py --shape llama-3-8b --model-cache /tmp/berth-models \\
        --out benchmarks/results/standby-shared-h200.md

On the CPU against a simulated GPU, to check the whole path::

    python benchmarks/standby_shared.py --device cpu --shape tiny --turns 6 --streams 2 \\
        --prompt-tokens 32 --output-tokens 8 --cpu-capacity-mib 4 --out /tmp/standby-shared.md
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import colocate  # noqa: E402  (the node agent, the runtimes under it, the test models)
import serve  # noqa: E402  (prompts and percentiles as the serving benchmark makes them)

from berth.runtime.engine import nvml  # noqa: E402
from berth.runtime.server.agent_client import AgentClient, AgentError  # noqa: E402

GIB = 1 << 30
NAMES = ("a", "b", "c")


@dataclass
class Request:
    turn: int
    model: str
    parked_before: bool  # the model's state when its turn began
    status: int = 0
    ttft_s: float = float("nan")
    e2e_s: float = float("nan")
    error: str = ""


@dataclass
class Residency:
    """Sampled while the traffic runs: the most tenants holding memory at once (the agent's
    ledger) and the device's peak used memory (NVML)."""

    most_resident: int = 0
    device_used_peak: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def watch(self, agent: AgentClient, uuid: str | None, period: float = 0.1) -> threading.Thread:
        def run() -> None:
            while not self._stop.wait(period):
                with contextlib.suppress(AgentError):
                    ledger = agent.ledger()
                    held = sum(1 for g in ledger.gpus for t in g.tenants if t.held_bytes > 0)
                    self.most_resident = max(self.most_resident, held)
                    self.samples += 1
                if uuid is not None and (mem := nvml.device_memory(uuid)) is not None:
                    self.device_used_peak = max(self.device_used_peak, mem[1])

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def stop(self, thread: threading.Thread) -> None:
        self._stop.set()
        thread.join()


def state_of(url: str) -> str:
    with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
        return str(json.loads(r.read())["state"])


def stream_one(url: str, ids: list[int], output_tokens: int, out: Request) -> None:
    """One streamed completion; fills ``out`` (TTFT: the first chunk that carries text)."""
    body = {"model": "bench", "prompt": ids, "max_tokens": output_tokens, "ignore_eos": True,
            "stream": True, "temperature": 0.0}  # fmt: skip
    request = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            out.status = r.status
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.error = str(chunk["error"])[:200]
                elif math.isnan(out.ttft_s) and chunk["choices"][0].get("text"):
                    out.ttft_s = time.perf_counter() - start
        out.e2e_s = time.perf_counter() - start
    except urllib.error.HTTPError as e:
        out.status, out.error = e.code, e.read().decode()[:200]
    except OSError as e:
        out.error = repr(e)[:200]


def traffic(args: argparse.Namespace, urls: dict[str, str], vocab: int) -> list[Request]:
    """The turns: each model twice in a row, ``--streams`` requests at once per turn."""
    order = [NAMES[(t // 2) % len(NAMES)] for t in range(args.turns)]
    done: list[Request] = []
    index = 0
    with concurrent.futures.ThreadPoolExecutor(args.streams) as pool:
        for turn, name in enumerate(order):
            states = {n: state_of(u) for n, u in urls.items()}
            parked = states[name] in ("standby", "parking")
            batch = [Request(turn, name, parked) for _ in range(args.streams)]
            futures = []
            for req in batch:
                ids = serve.prompt_ids(vocab, args.prompt_tokens, args.seed, index)
                index += 1
                futures.append(pool.submit(stream_one, urls[name], ids, args.output_tokens, req))
            concurrent.futures.wait(futures)
            done += batch
            ttfts = ", ".join(f"{r.ttft_s * 1e3:.0f}" for r in batch)
            print(f"turn {turn:2d} {name} ({'parked' if parked else 'resident'}): TTFT ms "
                  f"{ttfts}; status {sorted({r.status for r in batch})}; states {states}", flush=True)  # fmt: skip
            time.sleep(args.gap_s)
    return done


STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
EVENTS = {
    "ask": re.compile(r"waking: asking the node agent"),
    "order": re.compile(r"the node agent asked this runtime to park"),
    "parked": re.compile(r"parked \(node agent\) in ([\d.]+) s"),
    "woke": re.compile(r"woke in ([\d.]+) s \(([\d.]+) s waiting"),
}


def events(logs: dict[str, str]) -> list[tuple[float, str, str, tuple[float, ...]]]:
    """(time, tenant, kind, numbers) of the park and wake lines of the runtimes' logs."""
    found = []
    for name, text in logs.items():
        for line in text.splitlines():
            stamp = STAMP.match(line)
            if stamp is None:
                continue
            for kind, pattern in EVENTS.items():
                if (m := pattern.search(line)) is not None:
                    when = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                    found.append((when, name, kind, tuple(float(g) for g in m.groups())))
    return sorted(found)


def phases(found: list[tuple[float, str, str, tuple[float, ...]]]) -> list[dict[str, float]]:
    """Per wake: the park order reaching the resident runtime, its park, the grant after the
    park, and the wake's own mapping and copying (from the runtimes' logs)."""
    out = []
    for when, name, kind, numbers in found:
        if kind != "woke":
            continue
        total, waited = numbers
        asked = when - total
        others = [e for e in found if e[1] != name and asked - 0.05 <= e[0] <= when]
        order = next((e[0] for e in others if e[2] == "order"), None)
        parked = next((e for e in others if e[2] == "parked"), None)
        if order is None or parked is None:
            continue  # woke into free memory: nobody parked for it
        out.append({
            "order_s": order - asked,
            "park_s": parked[3][0],
            "grant_after_park_s": asked + waited - parked[0],
            "map_and_copy_s": total - waited,
            "wake_s": total,
        })  # fmt: skip
    return out


def run(args: argparse.Namespace, tmp: Path) -> dict:
    card = colocate.agent_gpu(args, tmp, "GPU-standby-cpu")
    ctx, allocatable, nvml_uuid = card.ctx, card.allocatable, card.nvml_uuid
    # Given again, after the benchmark's usual flags: the last one counts.
    agent_flags = [*card.agent_flags, "--heartbeat-interval", str(args.heartbeat_interval)]
    share = int(allocatable * args.request_fraction)
    results: dict = {
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "device": card.name,
        "capacity": card.capacity,
        "allocatable": allocatable,
        "share": share,
        "versions": colocate._versions(),
        "settings": {k: getattr(args, k) for k in SETTINGS},
    }
    cache = Path(args.model_cache or tmp)
    with colocate.node_agent(Path(ctx["socket"]), tmp / "agent.log", agent_flags) as agent:
        made = colocate.make_models(
            argparse.Namespace(**{**vars(args), "shapes": args.shape}), cache
        )
        model = made[args.shape]
        results["weights"] = model.weights_bytes
        tenants = {n: colocate.Model(n, model.path, model.weights_bytes, model.vocab_size)
                   for n in NAMES}  # fmt: skip
        colocate._wait_granting(agent)
        budgets = {n: (share, share) for n in NAMES}
        extra = ["--standby-idle-seconds", "0", "--wake-timeout", str(args.wake_timeout)]
        t0 = time.perf_counter()
        with colocate.serving(args, "standby", tenants, budgets, ctx, extra) as (urls, failed):
            results["start_s"] = time.perf_counter() - t0
            results["failed"] = failed
            if failed:
                raise RuntimeError(f"runtimes did not start: {', '.join(failed)}")
            residency = Residency()
            watcher = residency.watch(agent, nvml_uuid)
            try:
                requests = traffic(args, urls, model.vocab_size)
            finally:
                residency.stop(watcher)
            results["requests"] = [vars(r) for r in requests]
            results["most_resident"] = residency.most_resident
            results["residency_samples"] = residency.samples
            results["device_used_peak"] = residency.device_used_peak
            results["memory"] = {n: colocate._memory_line(colocate._log(ctx, "standby", n))
                                 for n in urls}  # fmt: skip
            logs = {n: colocate._log(ctx, "standby", n).read_text() for n in urls}
            results["phases"] = phases(events(logs))
            results["runtime_logs"] = {
                n: [line for line in text.splitlines() if "park" in line or "wak" in line
                    or "woke" in line][-120:]
                for n, text in logs.items()
            }  # fmt: skip
        results["agent_log"] = (tmp / "agent.log").read_text()[-4000:]
    return results


SETTINGS = ("shape", "device", "turns", "streams", "prompt_tokens", "output_tokens", "gap_s",
            "request_fraction", "max_num_seqs", "margin_gib", "wake_timeout", "heartbeat_interval")  # fmt: skip


def _ms(values: list[float], q: float) -> str:
    return f"{serve.percentile(values, q) * 1e3:.0f}" if values else "-"


def report(results: dict) -> str:
    s = results["settings"]
    reqs = results["requests"]
    ok = [r for r in reqs if r["status"] == 200 and not r["error"]]
    failed = [r for r in reqs if r not in ok]
    lines = [
        f"# Warm standby: three models on one {results['device']} that holds one at a time",
        "",
        f"{results['date']}, {results['versions']}; `benchmarks/standby_shared.py --shape "
        f"{s['shape']}`: three `berth serve` tenants of the {s['shape']} shape (random weights, "
        f"{results['weights'] / 1e9:.2f} GB each) under a real `berth node-agent`, each with "
        f"request = limit = {results['share'] / GIB:.1f} GiB ({s['request_fraction']:.0%} of "
        f"{results['allocatable'] / GIB:.1f} GiB allocatable), standby on, parking only when "
        f"the agent asks (agent heartbeat interval {s['heartbeat_interval']:g} s). {s['turns']} turns, each model twice in a row, {s['streams']} "
        f"streamed requests per turn ({s['prompt_tokens']} prompt + {s['output_tokens']} output "
        f"tokens), {s['gap_s']:g} s between turns. The runtimes started (one after the other: "
        f"each is admitted once the previous one parks) in {results['start_s']:.0f} s.",
        "",
        "| turn finds its model | requests | TTFT p50 (ms) | TTFT p99 (ms) | end to end p50 (ms) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, parked in (("parked (the agent parks another, then it wakes)", True),
                          ("resident", False)):  # fmt: skip
        rows = [r for r in ok if r["parked_before"] == parked]
        ttft = [r["ttft_s"] for r in rows]
        lines.append(
            f"| {label} | {len(rows)} | {_ms(ttft, 50)} | {_ms(ttft, 99)} | "
            f"{_ms([r['e2e_s'] for r in rows], 50)} |"
        )
    every = [r["ttft_s"] for r in ok]
    reasons = "; ".join(sorted({f"{r['status']} {r['error']}" for r in failed}))
    lines += [
        f"| all | {len(ok)} | {_ms(every, 50)} | {_ms(every, 99)} | "
        f"{_ms([r['e2e_s'] for r in ok], 50)} |",
        "",
        f"- Requests that failed: {len(failed)} of {len(reqs)}"
        + (f" ({reasons})." if failed else "."),
        f"- Most tenants holding memory at once (the agent's ledger, {results['residency_samples']}"
        f" samples every 0.1 s): {results['most_resident']}.",
    ]
    if results["device_used_peak"]:
        lines.append(
            f"- Device memory used at its peak (NVML): {results['device_used_peak'] / GIB:.1f} "
            f"of {results['capacity'] / GIB:.1f} GiB."
        )
    if results.get("phases"):
        lines += [
            "",
            "Where a parked turn's wait goes (medians over the wakes, from the runtimes' logs):",
            "",
            "| park order reaches the resident runtime | its park | grant after the park | "
            "the wake's mapping and copy | wake in all |",
            "| ---: | ---: | ---: | ---: | ---: |",
        ]
        keys = ("order_s", "park_s", "grant_after_park_s", "map_and_copy_s", "wake_s")
        medians = [statistics.median(p[k] for p in results["phases"]) for k in keys]
        lines += ["| " + " | ".join(f"{m * 1e3:.0f} ms" for m in medians) + " |", ""]
    lines += ["- Each runtime's start-up measurement:"]
    lines += [f"  - {n}: {line}" for n, line in results["memory"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--device", default="cuda", help="cpu: against a simulated GPU")
    parser.add_argument("--model-cache", help="where to make (or find) the test model")
    parser.add_argument("--turns", type=int, default=30)
    parser.add_argument("--streams", type=int, default=4, help="requests at once per turn")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--gap-s", type=float, default=1.0, help="between turns")
    parser.add_argument("--request-fraction", type=float, default=0.6,
                        help="each tenant's request, of the allocatable memory (> 0.5: one fits)")  # fmt: skip
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--margin-gib", type=float, default=1.0, help="left free on the card")
    parser.add_argument("--wake-timeout", type=float, default=60.0)
    parser.add_argument("--heartbeat-interval", type=float, default=1.0,
                        help="the node agent's (its default: 1 s)")  # fmt: skip
    parser.add_argument("--cpu-capacity-mib", type=float, default=4.0,
                        help="on the CPU: the simulated GPU's memory")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="standby-shared.md")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the runtimes on a timeout
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="berth-standby-") as tmp:
        results = run(args, Path(tmp))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    text = report(results)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
