"""Operator liveness and readiness, and the HTTP endpoint that serves them with the metrics.

Every long-running loop (a watch, the scheduling loop) registers a ``LoopHealth`` and beats it
whenever it makes progress. ``/healthz`` fails when a loop's thread has died or has not beaten
for ``stuck_after_s`` (the kubelet then restarts the operator: a process whose scheduler is dead
must not live on); ``/readyz`` fails until every loop has synced once (its first list handled),
so nothing relies on an operator that has not seen the cluster yet. ``/metrics`` is the
Prometheus text of ``OperatorMetrics``.
"""

import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from berth.operator.metrics import OperatorMetrics

log = logging.getLogger(__name__)


class LoopHealth:
    """One loop's progress; its methods are cheap enough to call per event."""

    def __init__(self, name: str, metrics: OperatorMetrics) -> None:
        self.name = name
        self.metrics = metrics
        self.thread: threading.Thread | None = None
        self.last_beat = time.monotonic()
        self.synced = False

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def mark_synced(self) -> None:
        self.synced = True
        self.beat()

    def restarted(self) -> None:
        self.metrics.loop_restarts.labels(self.name).inc()

    def handler_error(self) -> None:
        self.metrics.handler_errors.labels(self.name).inc()


class Health:
    def __init__(self, metrics: OperatorMetrics | None = None, stuck_after_s: float = 300.0):
        self.metrics = metrics or OperatorMetrics()
        self.stuck_after_s = stuck_after_s
        self.loops: dict[str, LoopHealth] = {}
        self.lock = threading.Lock()

    def loop(self, name: str, thread: threading.Thread | None = None) -> LoopHealth:
        """The health record of loop ``name`` (created on first use), run by ``thread``."""
        with self.lock:
            loop = self.loops.setdefault(name, LoopHealth(name, self.metrics))
        if thread is not None:
            loop.thread = thread
        return loop

    def problems(self) -> list[str]:
        """Why the operator is not alive: dead or stuck loops (empty when healthy)."""
        now = time.monotonic()
        found = []
        for loop in list(self.loops.values()):
            if loop.thread is not None and not loop.thread.is_alive():
                found.append(f"loop {loop.name} is dead")
            elif now - loop.last_beat > self.stuck_after_s:
                found.append(f"loop {loop.name} made no progress for {now - loop.last_beat:.0f}s")
        return found

    def unsynced(self) -> list[str]:
        """Why the operator is not ready: loops that have not synced yet."""
        return [
            f"loop {loop.name} has not synced" for loop in self.loops.values() if not loop.synced
        ]


class HealthServer:
    """``/healthz``, ``/readyz`` and ``/metrics`` on one port, served by a daemon thread."""

    def __init__(self, health: Health, host: str, port: int) -> None:
        self.health = health
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(
                        200, generate_latest(owner.health.metrics.registry), CONTENT_TYPE_LATEST
                    )
                elif path in ("/healthz", "/livez"):
                    self._report(owner.health.problems())
                elif path == "/readyz":
                    self._report(owner.health.problems() + owner.health.unsynced())
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _report(self, problems: list[str]) -> None:
                body = ("\n".join(problems) if problems else "ok") + "\n"
                self._send(500 if problems else 200, body.encode(), "text/plain; charset=utf-8")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # probes are noise
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="health", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> None:
        self.thread.start()
        log.info("health and metrics on http://%s:%d", *self.server.server_address[:2])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
