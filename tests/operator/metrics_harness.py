"""Runtimes' ``/metrics`` on loopback for the autoscaler's tests: the runtime's real collector over
fixed engine numbers, served by a small HTTP server that also records admin calls."""

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from berth.runtime.server import metrics


def runtime_registry(running: int, waiting: int, state: str = "active") -> CollectorRegistry:
    registry = CollectorRegistry()
    current = metrics.StandbyState(state)
    registry.register(
        metrics.RuntimeCollector(
            "m",
            lambda: metrics.RuntimeGauges(running=running, waiting=waiting),
            lambda: current,
            lambda: False,
            metrics.MemoryBudget(),
            metrics.ConnectionStats(),
        )
    )
    return registry


class RuntimeStub(ThreadingHTTPServer):
    """``GET /metrics`` from a real collector; ``POST /admin/park`` and ``/admin/wake`` recorded
    as (path, bearer), ``POST /admin/rotation`` as (routed, bearer)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.admin_calls: list[tuple[str, str]] = []
        self.rotation_calls: list[tuple[bool, str]] = []
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: RuntimeStub

    def do_GET(self) -> None:
        body = generate_latest(self.server.registry)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        bearer = self.headers.get("Authorization", "").removeprefix("Bearer ")
        sent = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path == "/admin/rotation":
            routed = json.loads(sent)["routed"]
            self.server.rotation_calls.append((routed, bearer))
            body = json.dumps({"routed": routed}).encode()
        else:
            self.server.admin_calls.append((self.path, bearer))
            body = b'{"state": "standby"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def runtime_stubs(*runtimes: tuple[int, int, str]) -> Iterator[list[RuntimeStub]]:
    """One stub per ``(running, waiting, state)``; stops them after."""
    stubs = [RuntimeStub(runtime_registry(*r)) for r in runtimes]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in stubs]
    for thread in threads:
        thread.start()
    try:
        yield stubs
    finally:
        for stub, thread in zip(stubs, threads, strict=True):
            stub.shutdown()
            stub.server_close()
            thread.join(timeout=5)


@contextmanager
def serving(*runtimes: tuple[int, int, str]) -> Iterator[list[int]]:
    """One server per ``(running, waiting, state)``; yields their ports."""
    with runtime_stubs(*runtimes) as stubs:
        yield [int(stub.server_port) for stub in stubs]
