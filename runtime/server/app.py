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
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from berth.runtime.server import errors, heap
from berth.runtime.server.admin import install_admin_routes
from berth.runtime.server.engine_loop import EngineLoadError, EngineLoop
from berth.runtime.server.engine_process import EngineFactory
from berth.runtime.server.errors import APIError, install_error_handlers
from berth.runtime.server.metrics import (
    ConnectionStats,
    RequestMetrics,
    RuntimeCollector,
    RuntimeGauges,
)
from berth.runtime.server.openapi import (
    ERRORS,
    PROBE,
    TOKENIZER_ERRORS,
    generation_responses,
    install_openapi,
)
from berth.runtime.server.prompts import PromptEncoder, prompt_byte_limit
from berth.runtime.server.protocol import ModelCard, ModelList
from berth.runtime.server.rotation import Rotation
from berth.runtime.server.settings import ServerSettings
from berth.runtime.server.standby import StandbyState

if TYPE_CHECKING:
    from berth.runtime.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """What the routes need of the model on the server's side: text in and out, its limits."""

    tokenizer: "Tokenizer"
    encoder: PromptEncoder  # tokenizes off the event loop
    max_model_len: int
    max_prompt_bytes: int


class ModelServer:
    """The state one server process shares between its routes, probes and lifecycle."""

    def __init__(self, settings: ServerSettings, engine_factory: EngineFactory) -> None:
        self.settings = settings
        self.model_name = settings.model_name
        self.created = int(time.time())
        self.registry = CollectorRegistry()
        self.metrics = RequestMetrics(self.registry, self.model_name)
        self.draining = False  # SIGTERM came: /ready fails (admitting ends when the loop closes)
        self.rotation = Rotation(settings.pod_info_dir)
        self.model: ServedModel | None = None
        self.loop = EngineLoop(
            engine_factory,
            self.metrics,
            max_running=settings.engine.max_num_seqs,
            max_waiting=settings.max_waiting_requests,
            retry_after_s=settings.retry_after_s,
            log_level=settings.log_level,
            standby=settings.standby,
        )
        self.load_error: str | None = None
        self.connections = ConnectionStats()
        self.on_load_failure: Callable[[], None] = lambda: None
        self._loading: asyncio.Task[None] | None = None
        self.registry.register(
            RuntimeCollector(
                self.model_name,
                gauges=lambda: self.loop.gauges() if self.model else RuntimeGauges(),
                state=lambda: self.state,
                draining=lambda: self.draining,
                budget=settings.memory,
                connections=self.connections,
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
        max_len = ready.max_model_len
        limit = prompt_byte_limit(self.settings.max_prompt_bytes, max_len)
        self.model = ServedModel(tokenizer, PromptEncoder(tokenizer), max_len, limit)
        pid = self.loop.process.pid if self.loop.process else None
        log.info("model %s loaded (engine process %s); serving", self.model_name, pid)
        heap.freeze_startup_heap("server")

    @property
    def state(self) -> StandbyState:
        """Warm standby's state: loading until the model and tokenizer are loaded, then the
        engine's own (it parks and wakes)."""
        return StandbyState.LOADING if self.model is None else self.loop.state

    async def stop(self) -> None:
        """Stop the engine process (aborting what runs) and wait for it to exit."""
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        await self.loop.stop()
        if self.model is not None:
            self.model.encoder.close()

    def card(self, model: str) -> ModelCard:
        """The model card of ``model``, or the 404/503 that explains why there is none."""
        served = self.loaded(model)
        return ModelCard(
            id=self.model_name, created=self.created, max_model_len=served.max_model_len
        )

    def loaded(self, model: str) -> ServedModel:
        """The loaded model named ``model``, or the 404/503 that explains why not."""
        retry = self.settings.retry_after_s
        if model != self.model_name:
            raise errors.model_not_found(model, self.model_name)
        if self.load_error is not None:
            raise errors.unavailable(self.load_error, "model_load_failed", retry)
        if self.model is None:
            raise errors.unavailable("The model is still loading.", "model_loading", retry)
        return self.model

    def serving_loop(self, model: str) -> tuple[EngineLoop, ServedModel]:
        """The engine loop and model for a request naming ``model``, or the 404/503 that
        explains why not."""
        retry = self.settings.retry_after_s
        served = self.loaded(model)
        if self.loop.closed:
            raise errors.unavailable(
                "The server is shutting down and admits no new requests.", "draining", retry
            )
        return self.loop, served

    def count_error(self, error: APIError) -> None:
        """Count a refused request by reason, unless the engine loop has counted it already."""
        if not error.counted:
            self.metrics.failed(error.code or error.type)


def get_server(request: Request) -> ModelServer:
    server: ModelServer = request.app.state.server
    return server


class CloseConnections:
    """ASGI middleware: while the server drains, or its pod is out of the Service's rotation
    (``rotation.py``), every response closes its connection, so that keep-alive clients
    reconnect (to another replica) instead of reusing this one."""

    def __init__(self, app: ASGIApp, server: ModelServer) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and (
                self.server.draining or self.server.rotation.out()
            ):
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_closing)


def create_app(settings: ServerSettings, engine_factory: EngineFactory) -> FastAPI:
    """The ASGI app: OpenAI routes, probes and ``/metrics`` around one engine."""
    from berth.runtime.server.chat import create_chat_completion
    from berth.runtime.server.completions import create_completion
    from berth.runtime.server.protocol import (
        ChatCompletionRequest,
        ChatCompletionResponse,
        CompletionRequest,
        CompletionResponse,
        DetokenizeRequest,
        DetokenizeResponse,
        TokenizeRequest,
        TokenizeResponse,
    )
    from berth.runtime.server.token_routes import detokenize, tokenize

    server = ModelServer(settings, engine_factory)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.start_loading()
        yield
        await server.stop()

    app = FastAPI(title="Berth model server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_middleware(CloseConnections, server=server)
    install_error_handlers(app, server.count_error)

    @app.get("/health", responses=PROBE)
    async def health() -> JSONResponse:
        """Liveness: the process works (loading counts); a failed engine or load does not."""
        failure = server.load_error or server.loop.failure
        if failure is not None:
            return JSONResponse({"status": "failed", "reason": failure}, status_code=503)
        return JSONResponse({"status": "ok", "state": server.state.value})

    @app.get("/ready", responses=PROBE)
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

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        """Prometheus metrics, under Berth's and vLLM's names."""
        return Response(generate_latest(server.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> ModelList:
        """The served model, once it is loaded (an empty list before)."""
        cards = [server.card(server.model_name)] if server.model is not None else []
        return ModelList(data=cards)

    @app.get("/v1/models/{model:path}", responses=ERRORS)
    async def model(model: str) -> ModelCard:
        """One model: 404 unless it is the served one, 503 while it loads."""
        return server.card(model)

    app.add_api_route(
        "/v1/completions", create_completion, methods=["POST"],
        responses=generation_responses(CompletionResponse),
    )  # fmt: skip
    app.add_api_route(
        "/v1/chat/completions", create_chat_completion, methods=["POST"],
        responses=generation_responses(ChatCompletionResponse),
    )  # fmt: skip
    app.add_api_route(
        "/tokenize", tokenize, methods=["POST"], response_model=TokenizeResponse,
        responses=TOKENIZER_ERRORS,
    )  # fmt: skip
    app.add_api_route(
        "/detokenize", detokenize, methods=["POST"], response_model=DetokenizeResponse,
        responses=TOKENIZER_ERRORS,
    )  # fmt: skip
    install_admin_routes(app, server)
    install_openapi(
        app,
        {
            "/v1/completions": CompletionRequest,
            "/v1/chat/completions": ChatCompletionRequest,
            "/tokenize": TokenizeRequest,
            "/detokenize": DetokenizeRequest,
        },
    )
    return app
