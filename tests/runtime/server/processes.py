"""Real ``berth`` processes for the multi-process tests: a free loopback port, a child that is
stopped (SIGTERM, then SIGKILL) however the test ends, and a ``berth serve`` as a pod runs it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from berth import wire


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop(process: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """SIGTERM (the process drains), then SIGKILL if it outlives ``timeout_s``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def child(
    command: list[str], log: Path, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``command`` with its output in ``log``, stopped when the block ends."""
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=dict(env or os.environ)
        )
    try:
        yield process
    finally:
        stop(process)


def serve_tiny(
    stack: ExitStack,
    log: Path,
    name: str,
    budget: tuple[int, int, str],
    socket_path: Path,
    env: Mapping[str, str] | None = None,
    flags: tuple[str, ...] = (),
) -> tuple[str, subprocess.Popen[bytes]]:
    """``berth serve`` of the tiny model on the CPU with a pod's budget (request, limit, GPU
    UUID) leased from the agent at ``socket_path``, as pod ``test/<name>``; its URL and process
    (stopped when ``stack`` closes)."""
    port = free_port()
    request, limit, gpu = budget
    environment = {
        **os.environ,
        wire.ENV_GPU_MEMORY_REQUEST: str(request),
        wire.ENV_GPU_MEMORY_LIMIT: str(limit),
        wire.ENV_GPU_UUID: gpu,
        wire.ENV_AGENT_SOCKET: str(socket_path),
        "POD_NAMESPACE": "test",
        "POD_NAME": name,
        **(env or {}),
    }
    command = [sys.executable, "-m", "berth", "serve", "--model", "tiny", "--device", "cpu",
               "--host", "127.0.0.1", "--port", str(port), "--no-access-log", *flags]  # fmt: skip
    process = stack.enter_context(child(command, log, environment))
    return f"http://127.0.0.1:{port}", process


def wait_until(predicate: Callable[[], object], what: str, timeout_s: float = 30.0) -> None:
    """Until ``predicate()`` is true; the failure names ``what``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s} s"
        time.sleep(0.05)


def wait_ready(url: str, log: Path, timeout_s: float = 240.0) -> None:
    """Until the runtime at ``url`` answers /ready; its log's tail in the failure."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not ready: {log.read_text()[-3000:]}")
