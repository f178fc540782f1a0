"""Real uvicorn servers on free loopback ports, each with a real engine process, for the tests."""

import contextlib
import functools
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from berth.runtime.engine import EngineConfig
from berth.runtime.server.app import ModelServer, create_app
from berth.runtime.server.connections import http_config
from berth.runtime.server.engine_process import EngineFactory, load_engine
from berth.runtime.server.lifecycle import DrainingServer, ShutdownBudget
from berth.runtime.server.settings import ServerSettings

MAX_NUM_SEQS = 4  # the test engine's running batch
NUM_KV_BLOCKS = 256


@dataclass
class RunningServer:
    base_url: str
    model_server: ModelServer
    http_server: DrainingServer
    thread: threading.Thread

    def metrics(self) -> str:
        return httpx.get(f"{self.base_url}/metrics", timeout=10).text


@contextlib.contextmanager
def running_server(
    engine: EngineConfig,
    factory: EngineFactory | None = None,
    engine_exit_code: int = 0,
    **settings: Any,
) -> Iterator[RunningServer]:
    """A real uvicorn server in a thread, bound to a free loopback port, whose engine process
    loads ``engine`` (with ``factory`` when given: it runs in the engine process). On leaving,
    the server and its engine process must have exited, the latter with ``engine_exit_code``."""
    # No shutdown delay unless a test asks: most tests drain at once.
    options: dict[str, Any] = {"served_model_name": "tiny", "log_level": "warning",
                               "shutdown_delay_s": 0}  # fmt: skip
    options.update(settings)
    config = ServerSettings(engine=engine, **options)
    app = create_app(config, factory or functools.partial(load_engine, engine))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    model_server: ModelServer = app.state.server
    server = DrainingServer(
        http_config(app, config, model_server.connections, access_log=False),
        model_server,
        ShutdownBudget.of(config),
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    # The engine process imports torch and loads the model: seconds, more on a busy machine.
    deadline = time.monotonic() + 180
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{base_url}/ready", timeout=5).status_code == 200:
                break
        assert app.state.server.load_error is None, app.state.server.load_error
        assert time.monotonic() < deadline, "server did not become ready"
        assert thread.is_alive(), "server thread died"
        time.sleep(0.05)
    try:
        yield RunningServer(base_url, app.state.server, server, thread)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "server thread did not stop"
        process = app.state.server.loop.process
        assert process is not None and process.exitcode == engine_exit_code, process


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = {k: v for k, v in s.labels.items() if k not in ("model", "model_name")}
            out[(s.name, frozenset(labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def wait_idle(server: RunningServer, timeout_s: float = 20.0) -> str:
    """Poll /metrics until nothing runs and no KV block is held; return the last scrape."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = server.metrics()
        idle = (
            value(text, "berth_requests_running") == 0
            and value(text, "berth_kv_cache_usage_ratio") == 0
            and value(text, "berth_kv_cache_blocks_free")
            == value(text, "berth_kv_cache_blocks_total")
        )
        if idle:
            return text
        assert time.monotonic() < deadline, text
        time.sleep(0.05)
