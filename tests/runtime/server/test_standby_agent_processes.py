"""Two real ``berth serve`` processes take turns on one logical GPU through a real node agent.

The GPU holds one runtime's request, not two; both have warm standby on (parking only when
asked). The second runtime's admission makes the agent park the first, which is idle; a request
to the parked one wakes it, and the agent parks the other (idle by then) to make room. Every
request succeeds, and the outputs after each wake equal those before the first park.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import httpx
from processes import child, serve_tiny

from berth import wire
from berth.e2e.agent_process import metric

WEIGHTS = 886_016  # the tiny model's fp32 weights
CHUNK = 65_536  # a KV chunk of the tiny model on the CPU
REQUEST = WEIGHTS + 4 * CHUNK + 1_000
CAPACITY = REQUEST + REQUEST // 2  # one resident runtime, never two
GPU = "GPU-standby-processes"
PROMPT = [(7 * j) % 500 + 3 for j in range(30)]


def _serve(stack: ExitStack, tmp: Path, name: str, sock: Path) -> str:
    url, _ = serve_tiny(
        stack, tmp / f"{name}.log", name, (REQUEST, REQUEST, GPU), sock,
        env={wire.ENV_STANDBY_IDLE_SECONDS: "0"},  # park only when asked
        flags=("--max-num-seqs", "4", "--wake-timeout", "60"),
    )  # fmt: skip
    return url


def _until(what: str, predicate: Callable[[], bool], log: Path, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{what} did not happen within {timeout_s} s: {log.read_text()[-3000:]}")


def _complete(url: str) -> str:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 24, "temperature": 0.0,
            "ignore_eos": True}  # fmt: skip
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def _state(url: str) -> str:
    return str(httpx.get(f"{url}/health", timeout=10).json()["state"])


def test_two_runtimes_take_turns_on_a_gpu_that_holds_one(tmp_path: Path) -> None:
    sock = tmp_path / "agent.sock"
    with ExitStack() as stack:
        agent_cmd = [sys.executable, "-m", "berth", "node-agent", "--socket", str(sock),
                     "--simulate-gpus", f"{GPU}:{CAPACITY}", "--heartbeat-interval", "0.3",
                     "--lease", "5", "--park-deadline", "20"]  # fmt: skip
        stack.enter_context(child(agent_cmd, tmp_path / "agent.log"))
        agent = stack.enter_context(
            httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://agent")
        )

        def states() -> dict[str, str]:
            gpus = agent.get("/v1/gpus").json()["gpus"]
            return {t["tenant"]: t["state"] for g in gpus for t in g["tenants"]}

        a = _serve(stack, tmp_path, "a", sock)
        _until("A ready", lambda: httpx.get(f"{a}/ready", timeout=5).is_success, tmp_path / "a.log")
        first = _complete(a)

        b = _serve(stack, tmp_path, "b", sock)  # admitted only once the agent has parked A
        _until("B ready", lambda: httpx.get(f"{b}/ready", timeout=5).is_success, tmp_path / "b.log")
        assert states() == {"test/a": "parked", "test/b": "active"}
        assert _state(a) == "standby" and _state(b) == "active"
        from_b = _complete(b)

        assert _complete(a) == first  # wakes A: the agent parks B, now idle
        assert states() == {"test/a": "active", "test/b": "parked"}
        assert _state(b) == "standby"
        assert _complete(b) == from_b == first  # and back again
        assert states() == {"test/a": "parked", "test/b": "active"}

        text = agent.get("/metrics").text
        assert metric(text, "berth_gpu_parks_total", gpu=GPU, reason="agent") == 3
        assert metric(text, "berth_gpu_memory_granted_bytes", gpu=GPU) <= CAPACITY
