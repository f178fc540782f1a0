"""Three real ``berth serve`` processes share one logical GPU through a real ``berth node-agent``.

The CPU build of the whole path: each runtime reads its budget from the pod's env vars, leases
it from the agent over the unix socket before loading, sizes its KV pool from it, and runs the
lease beside its engine. Under load, runtime A grows toward its limit and the agent grants bursts
from free memory; then newcomer C registers, the agent reclaims A's burst, A shrinks (preempting
the sequences in the released chunks) and releases, and C is admitted. Every request of the load
succeeds, and A's greedy outputs equal those of runtime B, which never resized.
"""

from __future__ import annotations

import concurrent.futures
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from processes import child, serve_tiny, wait_ready

WEIGHTS = 886_016  # the tiny model's fp32 weights (checked against the ledger below)
CHUNK = 65_536  # a KV chunk of the tiny model on the CPU: 8 blocks of 16 tokens
REQUEST = WEIGHTS + 4 * CHUNK + 1_000  # 4 chunks: 32 blocks
LIMIT = WEIGHTS + 24 * CHUNK + 1_000  # 24 chunks
CAPACITY = 3 * REQUEST + 3 * CHUNK  # three requests fit; a burst leaves no room for a third
GPU = "GPU-colocation-test"
PROMPTS = [[(13 * k + 5 * j) % 500 + 3 for j in range(40 + 7 * k)] for k in range(6)]
MAX_TOKENS = 160
pytestmark = pytest.mark.timeout(600) if hasattr(pytest.mark, "timeout") else []


def _serve(stack: ExitStack, tmp: Path, name: str, sock: Path) -> str:
    url, _ = serve_tiny(stack, tmp / f"{name}.log", name, (REQUEST, LIMIT, GPU), sock,
                      flags=("--max-num-seqs", "16"))  # fmt: skip
    return url


def _tenants(agent: httpx.Client) -> dict[str, dict]:
    gpus = agent.get("/v1/gpus").json()["gpus"]
    return {t["tenant"]: t for g in gpus for t in g["tenants"]}


def _wait_for(what: str, predicate, timeout_s: float, agent: httpx.Client) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        tenants = _tenants(agent)
        if predicate(tenants):
            return tenants
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout_s} s: {_tenants(agent)}")


def _complete(url: str, k: int) -> str:
    body = {"model": "tiny", "prompt": PROMPTS[k], "max_tokens": MAX_TOKENS,
            "temperature": 0.0, "ignore_eos": True}  # fmt: skip
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    return str(choice["text"])


def test_a_burst_is_granted_under_load_and_reclaimed_for_a_newcomer(tmp_path: Path) -> None:
    sock = tmp_path / "agent.sock"
    with ExitStack() as stack:
        agent_cmd = [sys.executable, "-m", "berth", "node-agent", "--socket", str(sock),
                     "--simulate-gpus", f"{GPU}:{CAPACITY}", "--heartbeat-interval", "0.3",
                     "--lease", "5", "--reclaim-deadline", "10"]  # fmt: skip
        stack.enter_context(child(agent_cmd, tmp_path / "agent.log"))
        a = _serve(stack, tmp_path, "a", sock)
        b = _serve(stack, tmp_path, "b", sock)
        wait_ready(a, tmp_path / "a.log")
        wait_ready(b, tmp_path / "b.log")
        agent = stack.enter_context(
            httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://agent")
        )
        # While it loads a runtime reports holding its whole request; its first heartbeat
        # after the load reports what it holds: the weights and the request's 4 chunks.
        _wait_for(
            "A's first report after its load",
            lambda t: t["test/a"]["held_bytes"] == WEIGHTS + 4 * CHUNK,
            10,
            agent,
        )

        # Load on A: more than its request's 32 blocks hold, so it grows toward its limit.
        stop, results, failures = threading.Event(), [], []

        def load(k: int) -> None:
            while not stop.is_set():
                try:
                    results.append((k, _complete(a, k)))
                except AssertionError as e:
                    failures.append(str(e))

        pool = concurrent.futures.ThreadPoolExecutor(len(PROMPTS) * 2)
        for i in range(len(PROMPTS) * 2):
            pool.submit(load, i % len(PROMPTS))
        # A grows in steps while its pool stays nearly full; wait until its burst takes the
        # room that a third request would need.
        burst = _wait_for(
            "a burst for A that leaves no room for a third request",
            lambda t: t["test/a"]["held_bytes"] > CAPACITY - 2 * REQUEST,
            120,
            agent,
        )
        assert burst["test/a"]["granted_bytes"] <= LIMIT

        c = _serve(stack, tmp_path, "c", sock)  # the newcomer: its request needs A's burst
        wait_ready(c, tmp_path / "c.log")
        after = _tenants(agent)
        assert after["test/c"]["held_bytes"] >= WEIGHTS + 4 * CHUNK
        assert sum(t["granted_bytes"] for t in after.values()) <= CAPACITY
        assert after["test/a"]["held_bytes"] < burst["test/a"]["held_bytes"], "no reclaim"
        time.sleep(2)  # a few more requests on A after the shrink
        stop.set()
        pool.shutdown(wait=True)

        assert not failures, failures[:3]
        assert len(results) >= len(PROMPTS)
        expected = {k: _complete(b, k) for k in range(len(PROMPTS))}  # B never resized
        assert all(text == expected[k] for k, text in results), "A's outputs changed"
        metrics = httpx.get(f"{a}/metrics").text
        preemptions = [
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("berth_preemptions_total")
        ]
        assert preemptions and preemptions[0] > 0, "the shrink preempted nothing"


def test_a_request_larger_than_the_guaranteed_pool_is_served_from_a_burst(tmp_path: Path) -> None:
    """A runtime whose request holds one chunk of KV (128 tokens) gets a 300-token prompt: the
    prompt waits, the runtime asks the agent for room for it (its pool's usage is 0 %, so usage
    alone never would), grows and serves it. Before, the prompt was refused as larger than the
    pool, with a 200 and no output (on an H100, ``colocate.py --mode a``: llama-3-8b at half an
    equal share served nothing)."""
    sock = tmp_path / "agent.sock"
    small = WEIGHTS + CHUNK + 1_000
    with ExitStack() as stack:
        agent_cmd = [sys.executable, "-m", "berth", "node-agent", "--socket", str(sock),
                     "--simulate-gpus", f"{GPU}:{CAPACITY}", "--heartbeat-interval", "0.3"]  # fmt: skip
        stack.enter_context(child(agent_cmd, tmp_path / "agent.log"))
        url, _ = serve_tiny(stack, tmp_path / "a.log", "a", (small, LIMIT, GPU), sock)
        wait_ready(url, tmp_path / "a.log")
        agent = stack.enter_context(
            httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://agent")
        )
        peak, done = [0], threading.Event()

        def watch() -> None:  # what A holds while the request runs (given back once idle)
            while not done.is_set():
                peak[0] = max(peak[0], _tenants(agent)["test/a"]["granted_bytes"])
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            prompt = [(7 * j) % 500 + 3 for j in range(300)]
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 40, "temperature": 0.0,
                    "ignore_eos": True}  # fmt: skip
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        finally:
            done.set()
            watcher.join()
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 40
        assert peak[0] >= WEIGHTS + 3 * CHUNK, peak  # 340 tokens: 22 blocks, 3 chunks at least
