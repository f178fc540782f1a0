"""The server process's life: load the model, serve with uvicorn, drain on SIGTERM, exit.

Kubernetes runs the pod's preStop sleep, then sends SIGTERM and, once
``terminationGracePeriodSeconds`` (counted from the preStop) have passed, SIGKILL. On SIGTERM:

1. ``/ready`` fails at once, yet requests are still admitted for ``shutdown_delay_s``, and
   every response closes its connection (keep-alive clients reconnect to another replica);
2. then new requests get 503 with Retry-After, and in-flight ones may finish for up to
   ``drain_grace_s``;
3. whatever still runs is aborted (its KV blocks freed, its stream ended), uvicorn closes the
   connections, the engine process is stopped (killed if it hangs), and the process exits 0.

Each step is bounded, and :class:`ShutdownBudget` adds them up: the sum plus the preStop sleep
must fit the grace period (``berth.wire`` holds the pod's numbers; a test checks the sum). A
second SIGTERM or a SIGINT exits at once; the engine process, which ignores both signals, exits
when its pipe to the server closes.
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
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import uvicorn

from berth import wire
from berth.runtime.server.app import ModelServer, create_app
from berth.runtime.server.connections import CONNECTION_CLOSE_S, http_config
from berth.runtime.server.engine_loop import ENGINE_KILL_S, ENGINE_STOP_S
from berth.runtime.server.engine_process import load_engine
from berth.runtime.server.settings import TINY, ServerSettings

log = logging.getLogger(__name__)

ABORT_FLUSH_S = 2.0  # after aborting, how long handlers get to send their streams' last events


@dataclass(frozen=True)
class ShutdownBudget:
    """The longest each step after SIGTERM may take, in seconds."""

    delay_s: float  # /ready fails, requests still admitted
    drain_s: float  # in-flight requests finish
    abort_flush_s: float = ABORT_FLUSH_S
    connection_close_s: float = CONNECTION_CLOSE_S
    engine_stop_s: float = ENGINE_STOP_S + ENGINE_KILL_S

    @classmethod
    def of(cls, settings: ServerSettings) -> "ShutdownBudget":
        return cls(delay_s=settings.shutdown_delay_s, drain_s=settings.drain_grace_s)

    @property
    def total_s(self) -> float:
        """From SIGTERM to exit at the latest (plus the interpreter's own exit)."""
        steps = (self.delay_s, self.drain_s, self.abort_flush_s, self.connection_close_s)
        return sum(steps) + self.engine_stop_s


async def drain(server: ModelServer, budget: ShutdownBudget) -> None:
    """Fail readiness, admit for ``budget.delay_s``, then stop admitting and wait up to
    ``budget.drain_s`` for in-flight requests; abort the rest."""
    server.draining = True
    loop = server.loop
    if budget.delay_s > 0:
        log.info("readiness fails; still admitting for %.1f s", budget.delay_s)
        await asyncio.sleep(budget.delay_s)
    loop.close()
    deadline = time.monotonic() + budget.drain_s
    if loop.in_flight:
        log.info(
            "draining %d in-flight sequence(s) for up to %.1f s", loop.in_flight, budget.drain_s
        )
    while loop.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if loop.in_flight:
        log.warning("drain timeout over: aborting %d sequence(s)", loop.in_flight)
        loop.abort_all("shutdown")
        end = time.monotonic() + budget.abort_flush_s
        while loop.in_flight and time.monotonic() < end:
            await asyncio.sleep(0.02)


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM drains the model server before exiting."""

    def __init__(
        self, config: uvicorn.Config, model_server: ModelServer, budget: ShutdownBudget
    ) -> None:
        super().__init__(config)
        self.model_server = model_server
        self.budget = budget
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
            await drain(self.model_server, self.budget)
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
        model_server: ModelServer = app.state.server
        config = http_config(app, settings, model_server.connections)
        server = DrainingServer(config, model_server, ShutdownBudget.of(settings))
        model_server.on_load_failure = lambda: server.fail(1)
        server.run()
    if model_server.load_error is not None:
        report_termination(model_server.load_error)
    return server.exit_code


def report_termination(message: str, path: Path = Path(wire.TERMINATION_LOG)) -> None:
    """Leave why the runtime stops where Kubernetes reads it (the container's termination message,
    which the operator shows in the service's Ready condition). Only into a file the kubelet
    created: outside a pod there is none, and nothing is written."""
    if path.is_file():
        with contextlib.suppress(OSError):
            path.write_text(message[: wire.TERMINATION_MESSAGE_BYTES])
