"""Runtimes' ``/metrics`` on loopback for the autoscaler's tests: the runtime's real collector over
fixed engine numbers, served by prometheus_client's own HTTP server."""

from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, start_http_server

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


@contextmanager
def serving(*runtimes: tuple[int, int, str]) -> Iterator[list[int]]:
    """One server per ``(running, waiting, state)``; yields their ports, stops them after."""
    servers = [
        start_http_server(0, addr="127.0.0.1", registry=runtime_registry(*r)) for r in runtimes
    ]
    try:
        yield [int(server.server_port) for server, _ in servers]
    finally:
        for server, thread in servers:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
