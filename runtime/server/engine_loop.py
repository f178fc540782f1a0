"""The bridge between the synchronous, single-threaded engine and asyncio request handlers.

One background thread owns the engine: it alone calls ``add_request``, ``abort_request``,
``step`` and ``stats``, so the engine needs no locks. Handlers talk to it through a command
queue (add, abort) and receive outputs on a per-request :class:`asyncio.Queue`; the thread
hands each step's outputs to the event loop in one ``call_soon_threadsafe`` call, so the
cost per step does not grow with a thread hop per stream.

Admission is decided on the event loop, under a lock shared with the thread: a request is
refused with 429 when the engine's waiting queue (as of the last step) has ``max_waiting``
requests, or when admitted-but-unfinished requests would exceed ``max_running + max_waiting``
(which bounds a burst that arrives between two steps). Every admitted request is tracked until
it finishes or is aborted; an abort always ends the request's stream with a final update, so a
handler never waits on a request the engine has forgotten.
"""

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from berth.runtime.server import errors
from berth.runtime.server.errors import APIError
from berth.runtime.server.metrics import RequestMetrics, RuntimeGauges

if TYPE_CHECKING:
    from berth.runtime.engine import EngineStats, RequestOutput, SamplingParams

log = logging.getLogger(__name__)


class ServableEngine(Protocol):
    """The part of the engine API (``berth.runtime.engine.Engine``) that the loop drives."""

    def add_request(
        self, request_id: str, prompt: str | list[int], params: "SamplingParams"
    ) -> None: ...
    def abort_request(self, request_id: str) -> None: ...
    def step(self) -> "list[RequestOutput]": ...
    def has_unfinished(self) -> bool: ...
    def stats(self) -> "EngineStats": ...


@dataclass(frozen=True)
class EngineRequest:
    """One sequence to generate: an HTTP request with n choices or a prompt list makes several."""

    request_id: str
    prompt_token_ids: list[int]
    params: "SamplingParams"


@dataclass(frozen=True, slots=True)
class Update:
    """What a handler receives for choice ``index``.

    ``output`` is the engine's output; None means the server aborted the request (drain,
    timeout, disconnect), which finishes the choice with finish reason ``abort``. ``error`` is
    set when the engine refused or failed the request.
    """

    index: int
    output: "RequestOutput | None"
    error: APIError | None = None

    @property
    def finished(self) -> bool:
        return self.output is None or self.error is not None or self.output.finished


@dataclass(eq=False)
class RequestStream:
    """The event-loop side of one admitted HTTP request: its updates, in engine order."""

    request_ids: list[str]
    deadline: float  # time.monotonic() after which the request times out
    timeout_s: float
    queue: asyncio.Queue[Update] = field(default_factory=asyncio.Queue)
    unfinished: int = 0

    def __post_init__(self) -> None:
        self.unfinished = len(self.request_ids)

    @property
    def done(self) -> bool:
        return self.unfinished == 0

    async def next_update(self) -> Update:
        """The next update; raises TimeoutError past the deadline."""
        if self.queue.empty():
            loop_deadline = asyncio.get_running_loop().time() + self.deadline - time.monotonic()
            async with asyncio.timeout_at(loop_deadline):
                update = await self.queue.get()
        else:
            update = self.queue.get_nowait()
        if update.finished:
            self.unfinished -= 1
        return update


@dataclass
class _Tracked:
    stream: RequestStream
    index: int
    arrival: float  # time.monotonic()
    last_token_at: float | None = None


@dataclass(frozen=True)
class _Add:
    stream: RequestStream
    requests: list[EngineRequest]
    arrival: float


@dataclass(frozen=True)
class _Abort:
    request_ids: list[str] | None  # None: every tracked request
    reason: str


_STOP = object()


class EngineLoop:
    """Drives ``engine.step()`` on a background thread and routes outputs to handlers."""

    def __init__(
        self,
        engine: ServableEngine,
        metrics: RequestMetrics,
        *,
        max_running: int,
        max_waiting: int,
        retry_after_s: int = 1,
        weights_bytes: int = 0,
    ) -> None:
        self._engine = engine
        self._metrics = metrics
        self._max_running = max_running
        self._max_waiting = max_waiting
        self._retry_after_s = retry_after_s
        self._weights_bytes = weights_bytes
        self._commands: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._in_flight = 0  # admitted and not finished (guarded by _lock)
        self._pending = 0  # admitted, not yet handed to the engine (guarded by _lock)
        self._closed = False
        self._failure: str | None = None
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._gauges = RuntimeGauges()
        self._engine_waiting = 0  # the engine's own waiting queue at the last refresh
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # Event-loop side.

    def run(self, loop: asyncio.AbstractEventLoop) -> None:
        """Drive the engine on the calling thread until :meth:`stop`, delivering to ``loop``.

        Call it on the thread that built the engine: CUDA's current device and stream, CUDA
        graphs and compiled kernels are then used on the thread they were made on.
        """
        self._loop = loop
        self._thread = threading.current_thread()
        self._refresh_gauges()
        self._run()

    def submit(
        self, requests: list[EngineRequest], arrival: float, timeout_s: float
    ) -> RequestStream:
        """Admit ``requests`` (the choices of one HTTP request) or raise a 4xx/503 APIError."""
        count = len(requests)
        capacity = self._max_running + self._max_waiting
        if count > capacity:
            raise errors.invalid_request(
                f"The request asks for {count} sequences; this server runs at most {capacity} "
                "at once. Lower n or send fewer prompts.",
                param="n",
            )
        with self._lock:
            if self._failure is not None:
                raise errors.unavailable(self._failure, "engine_failed", self._retry_after_s)
            if self._closed:
                raise errors.unavailable(
                    "The server is shutting down and admits no new requests.",
                    "draining",
                    self._retry_after_s,
                )
            # max(1, ...): with max_waiting 0 an idle queue still admits up to max_running.
            queue_full = self._engine_waiting >= max(1, self._max_waiting)
            if self._in_flight + count > capacity or queue_full:
                raise errors.queue_full(self._retry_after_s)
            self._in_flight += count
            self._pending += count
        stream = RequestStream(
            [r.request_id for r in requests], deadline=arrival + timeout_s, timeout_s=timeout_s
        )
        self._commands.put(_Add(stream, requests, arrival))
        return stream

    def abort(self, stream: RequestStream, reason: str) -> None:
        """Abort the stream's unfinished sequences (frees their KV blocks); idempotent."""
        if not stream.done:
            self._commands.put(_Abort(stream.request_ids, reason))

    def close(self) -> None:
        """Stop admitting: every later ``submit`` is a 503 (the drain's first step)."""
        with self._lock:
            self._closed = True

    def abort_all(self, reason: str) -> None:
        self._commands.put(_Abort(None, reason))

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @property
    def failure(self) -> str | None:
        """Why the engine stopped serving, or None while it is healthy."""
        return self._failure

    def gauges(self) -> RuntimeGauges:
        return self._gauges

    def stop(self, timeout_s: float = 10.0) -> None:
        """Abort whatever runs, end the thread and wait for it: the engine is free again."""
        self.close()
        self._commands.put(_STOP)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    # Engine-thread side.

    def _run(self) -> None:
        engine = self._engine
        while True:
            busy = engine.has_unfinished()
            commands: list[object] = []
            try:
                commands.append(self._commands.get(block=not busy))
                while True:
                    commands.append(self._commands.get_nowait())
            except queue.Empty:
                pass
            deliveries: list[tuple[RequestStream, Update]] = []
            for command in commands:
                if command is _STOP:
                    self._abort(None, "shutdown", deliveries)
                    self._refresh_gauges()
                    self._deliver(deliveries)
                    return
                if isinstance(command, _Add):
                    self._add(command, deliveries)
                elif isinstance(command, _Abort):
                    self._abort(command.request_ids, command.reason, deliveries)
            if engine.has_unfinished() and self._failure is None:
                try:
                    outputs = engine.step()
                except Exception as exc:
                    log.exception("engine step failed; failing every request")
                    self._fail_all(exc, deliveries)
                else:
                    self._route(outputs, time.monotonic(), deliveries)
            # Gauges first: a client that has seen an output must not scrape older gauges.
            self._refresh_gauges()
            self._deliver(deliveries)

    def _add(self, command: _Add, deliveries: list[tuple[RequestStream, Update]]) -> None:
        """Hand the request's sequences to the engine, all or none."""
        count = len(command.requests)
        with self._lock:
            self._pending -= count
        error = self._add_all(command)
        if error is None:
            return
        for index in range(count):
            self._metrics.failed(error.code or "engine_refused")
            deliveries.append((command.stream, Update(index, None, error)))
        with self._lock:
            self._in_flight -= count

    def _add_all(self, command: _Add) -> APIError | None:
        """Add every sequence, or none (undoing the added ones) and say why."""
        if self._failure is not None:
            return errors.unavailable(self._failure, "engine_failed", self._retry_after_s)
        added: list[str] = []
        try:
            for index, request in enumerate(command.requests):
                self._engine.add_request(
                    request.request_id, request.prompt_token_ids, request.params
                )
                self._tracked[request.request_id] = _Tracked(command.stream, index, command.arrival)
                added.append(request.request_id)
            return None
        except Exception as exc:
            for request_id in added:
                self._engine.abort_request(request_id)
                del self._tracked[request_id]
            if isinstance(exc, ValueError):  # the engine's verdict on bad input
                return errors.invalid_request(str(exc))
            log.exception("the engine failed to take a request")
            return APIError(
                500,
                f"The engine could not take the request ({type(exc).__name__}: {exc}).",
                type=errors.INTERNAL,
                code="engine_error",
            )

    def _abort(
        self,
        request_ids: list[str] | None,
        reason: str,
        deliveries: list[tuple[RequestStream, Update]],
    ) -> None:
        ids = list(self._tracked) if request_ids is None else request_ids
        aborted = 0
        for request_id in ids:
            tracked = self._tracked.pop(request_id, None)
            if tracked is None:
                continue
            self._engine.abort_request(request_id)
            self._metrics.failed(reason)
            deliveries.append((tracked.stream, Update(tracked.index, None)))
            aborted += 1
        if aborted:
            with self._lock:
                self._in_flight -= aborted

    def _fail_all(self, exc: Exception, deliveries: list[tuple[RequestStream, Update]]) -> None:
        self._failure = f"The engine failed ({type(exc).__name__}: {exc}); the server must restart."
        error = APIError(500, self._failure, type=errors.INTERNAL, code="engine_error")
        for request_id, tracked in self._tracked.items():
            try:
                self._engine.abort_request(request_id)
            except Exception:
                log.exception("abort after an engine failure failed too")
            self._metrics.failed("engine_error")
            deliveries.append((tracked.stream, Update(tracked.index, None, error)))
        with self._lock:
            self._in_flight -= len(self._tracked)
        self._tracked.clear()

    def _route(
        self,
        outputs: "list[RequestOutput]",
        now: float,
        deliveries: list[tuple[RequestStream, Update]],
    ) -> None:
        finished = 0
        metrics = self._metrics
        for output in outputs:
            tracked = self._tracked.get(output.request_id)
            if tracked is None:
                continue  # aborted by the server after the engine produced this output
            if output.new_token_ids:
                if tracked.last_token_at is None:
                    metrics.first_token(now - tracked.arrival, output.num_prompt_tokens)
                    metrics.tokens(len(output.new_token_ids), None)
                else:
                    metrics.tokens(len(output.new_token_ids), now - tracked.last_token_at)
                tracked.last_token_at = now
            if output.finished:
                del self._tracked[output.request_id]
                finished += 1
                if output.finish_reason == "abort":
                    metrics.failed("engine_abort")
                else:
                    metrics.finished(now - tracked.arrival, output.finish_reason or "stop")
            deliveries.append((tracked.stream, Update(tracked.index, output)))
        if finished:
            with self._lock:
                self._in_flight -= finished

    def _deliver(self, deliveries: list[tuple[RequestStream, Update]]) -> None:
        if deliveries and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_put_all, deliveries)

    def _refresh_gauges(self) -> None:
        stats = self._engine.stats()
        with self._lock:
            pending = self._pending
        self._engine_waiting = stats.num_waiting
        self._gauges = RuntimeGauges(
            running=stats.num_running,
            waiting=stats.num_waiting + pending,
            kv_cache_usage=stats.kv_cache_usage,
            total_blocks=stats.num_total_blocks,
            free_blocks=stats.num_free_blocks,
            preemptions=stats.num_preemptions,
            prefix_cache_queries=stats.prefix_cache_queries,
            prefix_cache_hits=stats.prefix_cache_hits,
            kv_cache_bytes=stats.kv_cache_bytes,
            resident_bytes=stats.kv_cache_bytes + self._weights_bytes,
        )


def _put_all(deliveries: list[tuple[RequestStream, Update]]) -> None:
    for stream, update in deliveries:
        stream.queue.put_nowait(update)
