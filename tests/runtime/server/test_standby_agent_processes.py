"""Two real ``berth serve`` processes take turns on one logical GPU through a real node agent.

The GPU holds one runtime's request, not two; both have warm standby on (parking only when
asked). The second runtime's admission makes the agent park the first, which is idle; a request
to the parked one wakes it, and the agent parks the other (idle by then) to make room. Every
request succeeds, and the outputs after each wake equal those before the first park.
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

from berth import wire
from berth.e2e.agent_process import metric

WEIGHTS = 886_016  # the tiny model's fp32 weights
CHUNK = 65_536  # a KV chunk of the tiny model on the CPU
REQUEST = WEIGHTS + 4 * CHUNK + 1_000
CAPACITY = REQUEST + REQUEST // 2  # one resident runtime, never two
GPU = "GPU-standby-processes"
PROMPT = [(7 * j) % 500 + 3 for j in range(30)]


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
        wire.ENV_STANDBY_IDLE_SECONDS: "0",  # park only when asked
        "POD_NAMESPACE": "test",
        "POD_NAME": name,
    }
    command = [sys.executable, "-m", "berth", "serve", "--model", "tiny", "--device", "cpu",
               "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", "4",
               "--wake-timeout", "60", "--no-access-log"]  # fmt: skip
    stack.enter_context(_process(command, tmp / f"{name}.log", env))
    return f"http://127.0.0.1:{port}"


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
        stack.enter_context(_process(agent_cmd, tmp_path / "agent.log", dict(os.environ)))
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
