"""SIGTERM: stop admitting, let in-flight requests finish within the grace period, then exit."""

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from server_harness import running_server, value

from berth.runtime.engine import EngineConfig
from berth.runtime.server.lifecycle import ShutdownBudget


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


@contextlib.contextmanager
def berth_serve(tmp_path: Path, *flags: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A real ``berth serve --model tiny`` on a free port, ready; killed if still running."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    berth = Path(sys.executable).parent / "berth"
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [str(berth), "serve", "--model", "tiny", "--device", "cpu", "--host", "127.0.0.1",
         "--port", str(port), "--max-num-seqs", "4", "--num-kv-blocks", "128",
         "--no-access-log", *flags],
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
        yield process, base_url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def test_berth_serve_process_drains_on_sigterm_and_exits_zero(tmp_path: Path) -> None:
    """A real ``berth serve``: drains, exits 0, and leaves no process behind."""
    with berth_serve(tmp_path, "--drain-timeout", "60", "--shutdown-delay", "0") as (
        process,
        base_url,
    ):
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


@dataclass
class Sent:
    started: float  # time.monotonic()
    status: int
    closes: bool  # the response said Connection: close


def client_load(base_url: str, routed_away: threading.Event, sent: list[Sent]) -> None:
    """One keep-alive client sending short completions until the "load balancer" (the
    watcher) has moved it away from this server."""
    with httpx.Client(base_url=base_url, timeout=60) as client:
        while not routed_away.is_set():
            started = time.monotonic()
            response = client.post("/v1/completions", json={**body(24), "stream": False})
            closes = response.headers.get("connection", "").lower() == "close"
            sent.append(Sent(started, response.status_code, closes))


def route_away_after(base_url: str, routed_away: threading.Event, propagation_s: float) -> None:
    """A load balancer: it sees /ready fail, and stops sending ``propagation_s`` later (the
    time an endpoint removal takes to reach every proxy)."""
    while httpx.get(f"{base_url}/ready", timeout=10).status_code == 200:
        time.sleep(0.05)
    time.sleep(propagation_s)
    routed_away.set()


def test_sigterm_under_load_fails_no_request_and_exits_within_its_budget(tmp_path: Path) -> None:
    """Clients keep sending until the load balancer, 1 s after /ready failed, stops routing to
    the server; a long stream runs through the drain. Nothing fails, and the process exits 0
    well within the budget that the pod's grace period is sized for."""
    delay_s, drain_s = 2.0, 20.0
    budget = ShutdownBudget(delay_s=delay_s, drain_s=drain_s)
    flags = ("--shutdown-delay", str(delay_s), "--drain-timeout", str(drain_s))
    with berth_serve(tmp_path, *flags) as (process, base_url):
        routed_away = threading.Event()
        sent: list[Sent] = []
        clients = [threading.Thread(target=client_load, args=(base_url, routed_away, sent))
                   for _ in range(3)]  # fmt: skip
        watcher = threading.Thread(target=route_away_after, args=(base_url, routed_away, 1.0))
        url = f"{base_url}/v1/completions"
        with httpx.stream("POST", url, json=body(300), timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            for thread in clients:
                thread.start()
            time.sleep(1.5)  # under load
            watcher.start()
            sigterm_at = time.monotonic()
            process.send_signal(signal.SIGTERM)
            reasons, done = finish_reasons(lines)
        assert done and reasons[-1] == "length"
        exit_code = process.wait(timeout=budget.total_s + 10)
        took = time.monotonic() - sigterm_at
        for thread in [*clients, watcher]:
            thread.join(30)
    assert exit_code == 0
    assert took < budget.total_s, f"exited {took:.1f} s after SIGTERM (budget {budget.total_s})"
    assert [s.status for s in sent if s.status != 200] == []
    after = [s for s in sent if s.started > sigterm_at + 0.2]
    assert after, "requests sent after SIGTERM (inside the shutdown delay) should be admitted"
    assert all(s.closes for s in after), "while draining, responses close their connections"
