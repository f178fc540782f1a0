"""The server process's life: load the model, serve with uvicorn, drain on SIGTERM, exit.

Kubernetes sends SIGTERM and, ``terminationGracePeriodSeconds`` later, SIGKILL. On SIGTERM the
server stops admitting (new requests get 503 with Retry-After, ``/ready`` fails so the pod
leaves the Service's endpoints), lets in-flight requests finish for up to the grace period,
aborts whatever still runs (freeing its KV blocks, ending its stream), then lets uvicorn close
connections, stops the engine process and exits with status 0. A second SIGTERM or a SIGINT
exits at once; the engine process, which ignores both signals, exits when its pipe to the
server closes.
"""

import asyncio
import contextlib
import functools
import logging
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import uvicorn

from berth.runtime.server.app import ModelServer, create_app
from berth.runtime.server.engine_process import load_engine
from berth.runtime.server.settings import TINY, ServerSettings

log = logging.getLogger(__name__)

CONNECTION_CLOSE_S = 5.0  # after the drain, how long uvicorn waits for responses to flush


async def drain(server: ModelServer, grace_s: float) -> None:
    """Stop admitting, wait up to ``grace_s`` for in-flight requests, then abort the rest."""
    server.draining = True
    loop = server.loop
    loop.close()
    deadline = time.monotonic() + grace_s
    if loop.in_flight:
        log.info("draining %d in-flight sequence(s) for up to %.1f s", loop.in_flight, grace_s)
    while loop.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if loop.in_flight:
        log.warning("grace period over: aborting %d sequence(s)", loop.in_flight)
        loop.abort_all("shutdown")
        end = time.monotonic() + CONNECTION_CLOSE_S
        while loop.in_flight and time.monotonic() < end:
            await asyncio.sleep(0.02)


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM drains the model server before exiting."""

    def __init__(self, config: uvicorn.Config, model_server: ModelServer, grace_s: float) -> None:
        super().__init__(config)
        self.model_server = model_server
        self.grace_s = grace_s
        self.exit_code = 0
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._event_loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self._drain_task is None and self._event_loop is not None:
            self._event_loop.call_soon_threadsafe(self._start_drain)
            return
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        log.info("SIGTERM: draining before exit")
        try:
            await drain(self.model_server, self.grace_s)
        finally:
            self.should_exit = True

    def fail(self, exit_code: int) -> None:
        """Exit soon with ``exit_code`` (the model could not be loaded)."""
        self.exit_code = exit_code
        self.should_exit = True


@contextlib.contextmanager
def model_directory(model: str, seed: int) -> Iterator[Path]:
    """The directory to load: ``model`` itself, or a temporary one for ``tiny``."""
    if model != TINY:
        yield Path(model)
        return
    with tempfile.TemporaryDirectory(prefix="berth-tiny-") as tmp:
        yield Path(tmp) / TINY


def serve(settings: ServerSettings) -> int:
    """Serve until SIGTERM (drained) or SIGINT; returns the process's exit status."""
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    with model_directory(settings.engine.model, settings.engine.seed) as model_dir:
        tiny_seed = settings.engine.seed if settings.engine.model == TINY else None
        factory = functools.partial(load_engine, settings.engine_config(str(model_dir)), tiny_seed)
        app = create_app(settings, factory)
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level.lower(),
            access_log=settings.access_log,
            timeout_graceful_shutdown=int(CONNECTION_CLOSE_S),
            lifespan="on",
        )
        server = DrainingServer(config, app.state.server, settings.drain_grace_s)
        app.state.server.on_load_failure = lambda: server.fail(1)
        server.run()
    return server.exit_code
