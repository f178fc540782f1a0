"""A real ``berth node-agent`` process on a unix socket, and an HTTP client for it (used by
the agent's unit tests in tests/runtime/agent and by the end-to-end tests)."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

MIB = 2**20


class AgentProcess:
    def __init__(self, socket: Path, log: Path, *flags: str) -> None:
        self.socket, self.log_path, self.flags = socket, log, flags
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        command = [sys.executable, "-m", "berth", "node-agent", "--socket", str(self.socket)]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*command, *self.flags], stdout=log, stderr=subprocess.STDOUT, env=os.environ
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"node agent exited {self.process.returncode}: {self.log()}")
            if self.socket.exists():
                try:
                    if self.client().get("/healthz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        raise AssertionError(f"node agent not up within {timeout_s} s: {self.log()}")

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 20.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def client(self) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=str(self.socket))
        return httpx.Client(transport=transport, base_url="http://agent", timeout=10.0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@contextmanager
def running_agent(directory: Path, *flags: str) -> Iterator[AgentProcess]:
    agent = AgentProcess(directory / "agent.sock", directory / "agent.log", *flags)
    agent.start()
    try:
        yield agent
    finally:
        agent.stop(signal.SIGKILL)


def wait_until_granting(client: httpx.Client, timeout_s: float = 30.0) -> None:
    """Until the agent's restart grace is over."""
    deadline = time.monotonic() + timeout_s
    while client.get("/healthz").json()["recovering_s"] > 0:
        assert time.monotonic() < deadline, "the agent stayed in its restart grace"
        time.sleep(0.1)


def metric(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None
