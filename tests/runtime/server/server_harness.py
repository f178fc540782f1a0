"""Real uvicorn servers on free loopback ports around a real engine, for the server tests."""

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn

from berth.runtime.engine import Engine
from berth.runtime.server.app import ModelServer, create_app
from berth.runtime.server.settings import ServerSettings


@dataclass
class RunningServer:
    base_url: str
    model_server: ModelServer

    def metrics(self) -> str:
        return httpx.get(f"{self.base_url}/metrics", timeout=10).text


@contextlib.contextmanager
def running_server(engine: Engine, **settings: Any) -> Iterator[RunningServer]:
    """A real uvicorn server in a thread, bound to a free loopback port, serving ``engine``."""
    options: dict[str, Any] = {"served_model_name": "tiny", "log_level": "warning"}
    options.update(settings)
    config = ServerSettings(engine=engine.config, **options)
    app = create_app(config, lambda: engine)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{base_url}/ready", timeout=5).status_code == 200:
                break
        assert time.monotonic() < deadline, "server did not become ready"
        assert thread.is_alive(), "server thread died"
        time.sleep(0.05)
    try:
        yield RunningServer(base_url, app.state.server)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "server thread did not stop"
        assert not engine.has_unfinished(), "the server left requests in the engine"
