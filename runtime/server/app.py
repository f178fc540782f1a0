"""The FastAPI application: the model server's state, its probes, metrics and model list.

:class:`ModelServer` is what every route reads. The engine process is started after the HTTP
server starts, so that ``/health`` answers and ``/ready`` says "loading" while weights load
(Kubernetes' startup and readiness probes see the truth); once it reports ready, the server
loads the tokenizer from the same directory and starts admitting requests.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from berth.runtime.server import errors
from berth.runtime.server.engine_loop import EngineLoadError, EngineLoop
from berth.runtime.server.engine_process import EngineFactory
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
    from berth.runtime.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """What the routes need of the model on the server's side: text in and out, and its limit."""

    tokenizer: "Tokenizer"
    max_model_len: int


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
        self.model: ServedModel | None = None
        self.loop = EngineLoop(
            engine_factory,
            self.metrics,
            max_running=settings.engine.max_num_seqs,
            max_waiting=settings.max_waiting_requests,
            retry_after_s=settings.retry_after_s,
            log_level=settings.log_level,
        )
        self.load_error: str | None = None
        self.on_load_failure: Callable[[], None] = lambda: None
        self._loading: asyncio.Task[None] | None = None
        self.registry.register(
            RuntimeCollector(
                self.model_name,
                gauges=lambda: self.loop.gauges() if self.model else RuntimeGauges(),
                state=lambda: self.state,
                draining=lambda: self.draining,
                budget=settings.memory,
            )
        )

    def start_loading(self) -> None:
        """Start the engine process; serve once it and the tokenizer are loaded."""
        self._loading = asyncio.ensure_future(self._load())

    async def _load(self) -> None:
        from berth.runtime.engine.tokenizer import Tokenizer

        try:
            ready = await self.loop.start()
            tokenizer = await asyncio.to_thread(Tokenizer, ready.model_dir)
        except (EngineLoadError, OSError, ValueError) as exc:
            log.error("loading the model failed: %s", exc)
            self.load_error = str(exc)
            self.on_load_failure()
            return
        self.model = ServedModel(tokenizer, ready.max_model_len)
        self.state = StandbyState.ACTIVE
        pid = self.loop.process.pid if self.loop.process else None
        log.info("model %s loaded (engine process %s); serving", self.model_name, pid)

    async def stop(self) -> None:
        """Stop the engine process (aborting what runs) and wait for it to exit."""
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        await self.loop.stop()

    def serving_loop(self, model: str) -> tuple[EngineLoop, ServedModel]:
        """The engine loop and model for a request naming ``model``, or the 404/503 that
        explains why not."""
        retry = self.settings.retry_after_s
        if self.load_error is not None:
            raise errors.unavailable(self.load_error, "model_load_failed", retry)
        if self.model is None:
            raise errors.unavailable("The model is still loading.", "model_loading", retry)
        if model != self.model_name:
            raise errors.model_not_found(model, self.model_name)
        if self.draining:
            raise errors.unavailable(
                "The server is shutting down and admits no new requests.", "draining", retry
            )
        return self.loop, self.model

    def count_error(self, error: APIError) -> None:
        """Count a refused request by reason, unless the engine loop has counted it already."""
        if not error.counted:
            self.metrics.failed(error.code or error.type)


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
        server.start_loading()
        yield
        await server.stop()

    app = FastAPI(title="Berth model server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    install_error_handlers(app, server.count_error)

    @app.get("/health")
    async def health() -> JSONResponse:
        """Liveness: the process works (loading counts); a failed engine or load does not."""
        failure = server.load_error or server.loop.failure
        if failure is not None:
            return JSONResponse({"status": "failed", "reason": failure}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: weights loaded, engine healthy, not draining."""
        failure = server.load_error or server.loop.failure
        reason = (
            failure
            or ("loading" if server.model is None else None)
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
        max_len = server.model.max_model_len if server.model is not None else 0
        card = ModelCard(id=server.model_name, created=server.created, max_model_len=max_len)
        return ModelList(data=[card]).model_dump()

    app.add_api_route("/v1/completions", create_completion, methods=["POST"])
    app.add_api_route("/v1/chat/completions", create_chat_completion, methods=["POST"])
    return app
