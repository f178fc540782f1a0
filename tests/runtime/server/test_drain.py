"""SIGTERM: stop admitting, let in-flight requests finish within the grace period, then exit."""

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from server_harness import running_server, value

from berth.runtime.engine import EngineConfig


def body(max_tokens: int) -> dict[str, object]:
    return {"model": "tiny", "prompt": "Harbour log:", "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True}  # fmt: skip


def finish_reasons(lines: Iterator[str]) -> tuple[list[str | None], bool]:
    """The finish reasons of the remaining chunks, and whether ``[DONE]`` ended the stream."""
    reasons: list[str | None] = []
    for line in lines:
        if line == "data: [DONE]":
            return reasons, True
        if line.startswith("data: "):
            reasons += [c["finish_reason"] for c in json.loads(line[6:])["choices"]]
    return reasons, False


def wait_until_draining(base_url: str) -> None:
    deadline = time.monotonic() + 20
    while httpx.get(f"{base_url}/ready", timeout=5).status_code != 503:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_sigterm_lets_a_running_stream_finish_and_refuses_new_requests(
    engine_config: EngineConfig,
) -> None:
    with running_server(engine_config, drain_grace_s=60) as server:
        url = f"{server.base_url}/v1/completions"
        with httpx.stream("POST", url, json=body(300), timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            server.http_server.handle_exit(signal.SIGTERM, None)
            wait_until_draining(server.base_url)
            assert value(server.metrics(), "berth_draining") == 1
            refused = httpx.post(url, json={**body(2), "stream": False}, timeout=30)
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "draining"
            assert refused.headers["Retry-After"] == "1"
            reasons, done = finish_reasons(lines)
        assert done and reasons[-1] == "length"
        server.thread.join(30)
        assert not server.thread.is_alive(), "the server should exit once drained"


def test_grace_period_over_aborts_the_stream_and_exits(engine_config: EngineConfig) -> None:
    with running_server(engine_config, drain_grace_s=0) as server:
        url = f"{server.base_url}/v1/completions"
        with httpx.stream("POST", url, json=body(450), timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            server.http_server.handle_exit(signal.SIGTERM, None)
            reasons, done = finish_reasons(lines)
        assert done and reasons[-1] == "abort"
        server.thread.join(30)
        assert not server.thread.is_alive()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def children(pid: int) -> list[int]:
    """The ids of ``pid``'s child processes (Linux /proc)."""
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return [int(c) for task in tasks for c in (task / "children").read_text().split()]


def test_berth_serve_process_drains_on_sigterm_and_exits_zero(tmp_path: Path) -> None:
    """A real ``berth serve``: drains, exits 0, and leaves no process behind."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    berth = Path(sys.executable).parent / "berth"
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [str(berth), "serve", "--model", "tiny", "--device", "cpu", "--host", "127.0.0.1",
         "--port", str(port), "--drain-timeout", "60", "--max-num-seqs", "4",
         "--num-kv-blocks", "128", "--no-access-log"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base_url}/ready", timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline, "berth serve did not become ready"
            time.sleep(0.2)
        helpers = children(process.pid)  # the engine process (and multiprocessing's tracker)
        assert helpers, "the engine should run in a process of its own"
        url = f"{base_url}/v1/completions"
        with httpx.stream("POST", url, json=body(400), timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            process.send_signal(signal.SIGTERM)
            wait_until_draining(base_url)
            reasons, done = finish_reasons(lines)
        assert done and reasons[-1] == "length"
        assert process.wait(timeout=60) == 0
        output = (tmp_path / "serve.log").read_text()
        assert "draining" in output
        deadline = time.monotonic() + 20
        while alive := [pid for pid in helpers if Path(f"/proc/{pid}").exists()]:
            assert time.monotonic() < deadline, f"processes left behind: {alive}"
            time.sleep(0.1)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
