"""The FastAPI application: the model server's state, its probes, metrics and model list.

:class:`ModelServer` is what every route reads. The engine is built on a background thread
after the HTTP server starts, so that ``/health`` answers and ``/ready`` says "loading" while
weights load (Kubernetes' startup and readiness probes see the truth), then the
:class:`EngineLoop` takes over the engine.
"""

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from berth.runtime.server import errors
from berth.runtime.server.engine_loop import EngineLoop
from berth.runtime.server.errors import APIError, install_error_handlers
from berth.runtime.server.metrics import (
    RequestMetrics,
    RuntimeCollector,
    RuntimeGauges,
    StandbyState,
)
from berth.runtime.server.protocol import ModelCard, ModelList
from berth.runtime.server.settings import ServerSettings

if TYPE_CHECKING:
    from berth.runtime.engine import Engine

log = logging.getLogger(__name__)

EngineFactory = Callable[[], "Engine"]


class ModelServer:
    """The state one server process shares between its routes, probes and lifecycle."""

    def __init__(self, settings: ServerSettings, engine_factory: EngineFactory) -> None:
        self.settings = settings
        self.model_name = settings.model_name
        self.created = int(time.time())
        self.registry = CollectorRegistry()
        self.metrics = RequestMetrics(self.registry, self.model_name)
        self.state = StandbyState.LOADING
        self.draining = False
        self.engine: Engine | None = None
        self.loop: EngineLoop | None = None
        self.load_error: str | None = None
        self.on_load_failure: Callable[[], None] = lambda: None
        self._engine_factory = engine_factory
        self._lock = threading.Lock()
        self._stopping = False
        self.registry.register(
            RuntimeCollector(
                self.model_name,
                gauges=lambda: self.loop.gauges() if self.loop else RuntimeGauges(),
                state=lambda: self.state,
                draining=lambda: self.draining,
                budget=settings.memory,
            )
        )

    def start_loading(self, event_loop: asyncio.AbstractEventLoop) -> None:
        """Build the engine on a thread of its own, which then drives it (EngineLoop.run)."""

        def load_and_drive() -> None:
            try:
                engine = self._engine_factory()
                loop = EngineLoop(
                    engine,
                    self.metrics,
                    max_running=self.settings.engine.max_num_seqs,
                    max_waiting=self.settings.max_waiting_requests,
                    retry_after_s=self.settings.retry_after_s,
                    weights_bytes=weights_bytes(engine),
                )
            except Exception as exc:
                log.exception("loading the model failed")
                self.load_error = f"loading the model failed: {type(exc).__name__}: {exc}"
                event_loop.call_soon_threadsafe(self.on_load_failure)
                return
            with self._lock:
                if self._stopping:
                    return
                self.engine, self.loop = engine, loop
            self.state = StandbyState.ACTIVE
            log.info("model %s loaded; serving", self.model_name)
            loop.run(event_loop)

        threading.Thread(target=load_and_drive, name="berth-engine", daemon=True).start()

    def stop(self) -> None:
        """Stop the engine loop (aborting what runs) and wait for its thread."""
        with self._lock:
            self._stopping = True
            loop = self.loop
        if loop is not None:
            loop.stop()

    def serving_loop(self, model: str) -> EngineLoop:
        """The engine loop for a request naming ``model``, or the 404/503 that explains why not."""
        retry = self.settings.retry_after_s
        if self.load_error is not None:
            raise errors.unavailable(self.load_error, "model_load_failed", retry)
        if self.loop is None or self.engine is None:
            raise errors.unavailable("The model is still loading.", "model_loading", retry)
        if model != self.model_name:
            raise errors.model_not_found(model, self.model_name)
        if self.draining:
            raise errors.unavailable(
                "The server is shutting down and admits no new requests.", "draining", retry
            )
        return self.loop

    def count_error(self, error: APIError) -> None:
        """Count a refused request by reason, unless the engine loop has counted it already."""
        if not error.counted:
            self.metrics.failed(error.code or error.type)


def weights_bytes(engine: "Engine") -> int:
    """Bytes of the engine's weights: parameters and buffers of its model, where it exposes one."""
    model = getattr(getattr(engine, "runner", None), "model", None)
    if model is None or not hasattr(model, "parameters"):
        return 0
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def get_server(request: Request) -> ModelServer:
    server: ModelServer = request.app.state.server
    return server


def create_app(settings: ServerSettings, engine_factory: EngineFactory) -> FastAPI:
    """The ASGI app: OpenAI routes, probes and ``/metrics`` around one engine."""
    from berth.runtime.server.chat import create_chat_completion
    from berth.runtime.server.completions import create_completion

    server = ModelServer(settings, engine_factory)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.start_loading(asyncio.get_running_loop())
        yield
        await asyncio.to_thread(server.stop)

    app = FastAPI(title="Berth model server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    install_error_handlers(app, server.count_error)

    @app.get("/health")
    async def health() -> JSONResponse:
        """Liveness: the process works (loading counts); a failed engine or load does not."""
        failure = server.load_error or (server.loop.failure if server.loop else None)
        if failure is not None:
            return JSONResponse({"status": "failed", "reason": failure}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: weights loaded, engine healthy, not draining."""
        failure = server.load_error or (server.loop.failure if server.loop else None)
        reason = (
            failure
            or ("loading" if server.loop is None else None)
            or ("draining" if server.draining else None)
        )
        if reason is not None:
            return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ready", "state": server.state.value})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        max_len = server.engine.max_model_len if server.engine is not None else 0
        card = ModelCard(id=server.model_name, created=server.created, max_model_len=max_len)
        return ModelList(data=[card]).model_dump()

    app.add_api_route("/v1/completions", create_completion, methods=["POST"])
    app.add_api_route("/v1/chat/completions", create_chat_completion, methods=["POST"])
    return app
