"""The HTTP server's connection handling: uvicorn's h11 protocol with a deadline for headers.

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive``, but a connection
that sends nothing, or half of a request's headers, is held forever: its timer starts only
after a response and stops at the first byte. So each connection here must deliver a
request's complete headers within ``header_timeout_s`` of opening (or of its previous
response), else it is closed and counted. The body has its own deadline in :mod:`.body` (a 408,
since a request exists by then).

Connections are bounded with uvicorn's ``limit_concurrency``: past ``max_connections`` open
connections (or requests in progress) a request gets uvicorn's 503 at once. The bound sits
well above what admission can use (``max_num_seqs`` + ``max_waiting_requests``, beyond which
requests get 429 anyway), so it binds only under a flood of connections, and the deadlines
above empty such a flood within seconds, well inside the liveness probe's failure window.
"""

import asyncio
import functools
import logging
from typing import Any, cast

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from berth.runtime.server.metrics import ConnectionStats
from berth.runtime.server.settings import ServerSettings

log = logging.getLogger(__name__)

CONNECTION_CLOSE_S = 3  # uvicorn's graceful shutdown: how long responses may take to flush


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for each request's headers and the counts."""

    def __init__(
        self, *args: Any, stats: ConnectionStats, header_timeout_s: float, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._stats = stats
        self._header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._stats.open += 1
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        self._stats.open -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # a request's headers are complete: its cycle has begun
            self._stop_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        waiting = self.cycle is None or self.cycle.response_complete  # not a pipelined request
        if waiting and not self.transport.is_closing():
            self._await_headers()

    def _await_headers(self) -> None:
        self._stop_header_timer()
        self._header_timer = self.loop.call_later(self._header_timeout_s, self._headers_late)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        self._stats.header_timeouts += 1
        log.info(
            "closing the connection from %s: no complete request headers within %g s",
            self.client,
            self._header_timeout_s,
        )
        self.transport.close()


def http_config(
    app: FastAPI, settings: ServerSettings, stats: ConnectionStats, **overrides: Any
) -> uvicorn.Config:
    """uvicorn's configuration for ``app`` under ``settings`` (``overrides`` win)."""
    protocol = functools.partial(
        TimedH11Protocol, stats=stats, header_timeout_s=settings.header_timeout_s
    )
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level.lower(),
        "access_log": settings.access_log,
        "http": cast(type[asyncio.Protocol], protocol),
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "limit_concurrency": settings.max_connections,
        "timeout_graceful_shutdown": CONNECTION_CLOSE_S,
        "lifespan": "on",
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)
