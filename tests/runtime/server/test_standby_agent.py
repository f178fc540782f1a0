"""The node agent decides who is resident: two real ``berth serve`` processes with warm standby
on share one logical GPU that holds only one of them, under a real ``berth node-agent``.

A serves, then sits idle; B starts, and its admission needs A's memory, so the agent asks A to
park (the lease thread calls the engine's park) and admits B once A released it. A request to
A then wakes it: A's lease asks for its request back, the agent parks idle B to make room, and
A answers with the same text as before it ever parked. Nothing fails on the way.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from berth import wire

WEIGHTS = 886_016  # the tiny model's fp32 weights
CHUNK = 65_536  # a KV chunk of the tiny model on the CPU
REQUEST = WEIGHTS + 4 * CHUNK + 1_000
CAPACITY = REQUEST + 2 * CHUNK  # one tenant's request fits, two do not
GPU = "GPU-standby-agent-test"
PROMPT = [(13 * j) % 500 + 3 for j in range(30)]
pytestmark = pytest.mark.timeout(600) if hasattr(pytest.mark, "timeout") else []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _process(command: list[str], log: Path, env: dict[str, str]) -> Iterator[None]:
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        yield
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _serve(stack: ExitStack, tmp: Path, name: str, sock: Path) -> str:
    port = _free_port()
    env = {
        **os.environ,
        wire.ENV_GPU_MEMORY_REQUEST: str(REQUEST),
        wire.ENV_GPU_MEMORY_LIMIT: str(REQUEST),
        wire.ENV_GPU_UUID: GPU,
        wire.ENV_AGENT_SOCKET: str(sock),
        wire.ENV_STANDBY_IDLE_SECONDS: "0",  # park only when asked (here: by the agent)
        "POD_NAMESPACE": "test",
        "POD_NAME": name,
    }
    command = [sys.executable, "-m", "berth", "serve", "--model", "tiny", "--device", "cpu",
               "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", "4",
               "--wake-timeout", "60", "--no-access-log"]  # fmt: skip
    stack.enter_context(_process(command, tmp / f"{name}.log", env))
    return f"http://127.0.0.1:{port}"


def _wait(what: str, predicate: Callable[[], bool], log: Path, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if predicate():
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what} did not happen in {timeout_s} s: {log.read_text()[-3000:]}"
            )
        time.sleep(0.2)


def _state(url: str) -> str:
    return str(httpx.get(f"{url}/health", timeout=5).json()["state"])


def _complete(url: str) -> str:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 32, "temperature": 0.0,
            "ignore_eos": True}  # fmt: skip
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=180)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def test_the_agent_parks_the_idle_tenant_for_a_newcomer_and_a_request_wakes_it_back(
    tmp_path: Path,
) -> None:
    sock = tmp_path / "agent.sock"
    with ExitStack() as stack:
        agent_cmd = [sys.executable, "-m", "berth", "node-agent", "--socket", str(sock),
                     "--simulate-gpus", f"{GPU}:{CAPACITY}", "--heartbeat-interval", "0.3",
                     "--lease", "5", "--reclaim-deadline", "10", "--park-deadline", "20"]  # fmt: skip
        stack.enter_context(_process(agent_cmd, tmp_path / "agent.log", dict(os.environ)))
        a = _serve(stack, tmp_path, "a", sock)
        _wait("A ready", lambda: httpx.get(f"{a}/ready").status_code == 200, tmp_path / "a.log")
        before = _complete(a)
        assert _state(a) == "active"

        b = _serve(stack, tmp_path, "b", sock)  # its request needs A's memory
        _wait("B ready", lambda: httpx.get(f"{b}/ready").status_code == 200, tmp_path / "b.log")
        assert _state(a) == "standby", "the agent did not park idle A for B"
        assert _state(b) == "active"
        assert httpx.get(f"{a}/ready").status_code == 200  # a parked runtime stays Ready

        assert _complete(a) == before  # wakes A: the agent parks idle B to make room
        assert _state(a) == "active"
        _wait("B parked", lambda: _state(b) == "standby", tmp_path / "b.log", 30)
        assert _complete(b) == before  # and B wakes back in turn (same model, same seed)
        _wait("A parked", lambda: _state(a) == "standby", tmp_path / "a.log", 30)
