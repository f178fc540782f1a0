"""The server's side of the engine process: admission, routing of outputs, failure handling.

The engine runs in a process of its own (:mod:`.engine_process`); this module spawns it and
talks to it over a pipe. Everything here runs on the server's event loop, so it needs no locks:
handlers call :meth:`EngineLoop.submit` and :meth:`EngineLoop.abort`, which send commands, and
the pipe's file descriptor is watched by the loop (``add_reader``), which routes each
:class:`StepReport`'s outputs to per-request :class:`asyncio.Queue` s and records metrics.

Admission: a request is refused with 429 when the engine's waiting queue (as of its last
report) has ``max_waiting`` requests, or when admitted-but-unfinished sequences would exceed
``max_running + max_waiting`` (which bounds a burst that arrives between two reports). Every
admitted sequence is tracked until it finishes or is aborted; an abort ends the sequence's
stream at once with a final update, so a handler never waits on a request the engine has
forgotten. If the engine process fails or dies, every tracked sequence ends with a 500, later
requests get 503 and :attr:`EngineLoop.failure` says why (the probes fail on it).

Warm standby: the engine process decides and reports its residency (``standby.py``); this side
mirrors it (:attr:`EngineLoop.state`), sends :class:`ParkEngine` / :class:`WakeEngine` for the
admin endpoints, and keeps submitting while parked: the engine holds those requests and wakes
for them. A wake that gets no memory refuses them as retryable: 503 with Retry-After.
"""

import asyncio
import contextlib
import logging
import multiprocessing
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from berth.runtime.server import errors
from berth.runtime.server.engine_messages import (
    STOP,
    AbortRequests,
    AddRequests,
    EngineFailed,
    EngineReady,
    EngineRequest,
    OutputRow,
    ParkEngine,
    StepReport,
    WakeEngine,
    output_from_row,
)
from berth.runtime.server.engine_process import EngineFactory, run_engine_process
from berth.runtime.server.errors import APIError
from berth.runtime.server.metrics import RequestMetrics, RuntimeGauges
from berth.runtime.server.standby import StandbyPolicy, StandbyState

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from berth.runtime.engine import EngineStats, RequestOutput

log = logging.getLogger(__name__)

ENGINE_STOP_S = 5.0  # how long a stopping engine process may take before it is killed
ENGINE_KILL_S = 2.0  # and how long after the kill the server waits for it to be gone


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
    """The event-loop side of one admitted HTTP request: its updates, in engine order.

    The deadline is one timer per request that queues ``None`` when it passes (a timeout
    around every wait for a token cost more than building the token's chunk).
    """

    request_ids: list[str]
    deadline: float  # time.monotonic() after which the request times out
    timeout_s: float
    queue: asyncio.Queue[Update | None] = field(default_factory=asyncio.Queue)
    unfinished: int = 0
    _timer: asyncio.TimerHandle | None = None

    def __post_init__(self) -> None:
        self.unfinished = len(self.request_ids)

    @property
    def done(self) -> bool:
        return self.unfinished == 0

    def start_deadline(self) -> None:
        """Arm the deadline on the running event loop."""
        loop = asyncio.get_running_loop()
        when = loop.time() + self.deadline - time.monotonic()
        self._timer = loop.call_at(when, self.queue.put_nowait, None)

    def cancel_deadline(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def next_update(self) -> Update:
        """The next update; raises TimeoutError past the deadline."""
        queue = self.queue
        update = queue.get_nowait() if not queue.empty() else await queue.get()
        if update is None:
            raise TimeoutError
        if update.finished:
            self.unfinished -= 1
            if self.unfinished == 0:
                self.cancel_deadline()
        return update


@dataclass(slots=True)
class _Tracked:
    stream: RequestStream
    index: int
    arrival: float  # time.monotonic()
    last_token_at: float | None = None


class EngineLoadError(Exception):
    """The engine process could not load the model."""


class EngineLoop:
    """Runs the engine in its own process and routes its outputs to request handlers."""

    def __init__(
        self,
        factory: EngineFactory,
        metrics: RequestMetrics,
        *,
        max_running: int,
        max_waiting: int,
        retry_after_s: int = 1,
        log_level: str = "info",
        standby: StandbyPolicy = StandbyPolicy(),  # noqa: B008  (frozen)
    ) -> None:
        self._factory = factory
        self._standby = standby
        self._state = StandbyState.LOADING
        # How often each state was entered, as reported (a park and a wake may both happen
        # between two looks, so callers that wait compare counts, not just the state).
        self.entered: dict[StandbyState, int] = dict.fromkeys(StandbyState, 0)
        self._metrics = metrics
        self._max_running = max_running
        self._max_waiting = max_waiting
        self._retry_after_s = retry_after_s
        self._log_level = log_level
        self._in_flight = 0  # admitted and not finished
        self._sent = 0  # sequences sent to the engine, cumulative
        self._taken = 0  # of those, taken by the engine as of its last report
        self._closed = False
        self._failure: str | None = None
        self._tracked: dict[str, _Tracked] = {}
        self._gauges = RuntimeGauges()
        self._weights_bytes = 0
        self._engine_waiting = 0  # the engine's own waiting queue at its last report
        self._conn: Connection | None = None
        self._process: BaseProcess | None = None
        self._ready: asyncio.Future[EngineReady] | None = None

    async def start(self) -> EngineReady:
        """Spawn the engine process and wait until it has loaded the model.

        'spawn', not 'fork': CUDA cannot be used in a forked child of a process that touched it,
        and a fresh interpreter does not inherit the server's threads.
        """
        loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe(duplex=True)
        process = context.Process(
            target=run_engine_process,
            args=(theirs, self._factory, self._log_level, self._standby),
            name="berth-engine",
        )
        self._ready = loop.create_future()
        self._conn, self._process = ours, process
        process.start()
        theirs.close()  # the child holds its end: EOF here once the child is gone
        loop.add_reader(ours.fileno(), self._on_readable)
        ready = await self._ready
        self._weights_bytes = ready.weights_bytes
        self._set_state(StandbyState.ACTIVE)
        self._refresh_gauges(ready.stats, 0)
        return ready

    @property
    def state(self) -> StandbyState:
        """The engine's residency as of its last report."""
        return self._state

    @property
    def standby(self) -> StandbyPolicy:
        return self._standby

    def park(self, reason: str) -> None:
        """Ask the engine to park (it finishes or preempts what runs first); see ``state``."""
        self._send(ParkEngine(reason))

    def wake(self) -> None:
        """Ask the engine to wake now rather than at the next request; see ``state``."""
        self._send(WakeEngine())

    def _set_state(self, state: StandbyState) -> None:
        if state is not self._state:
            self._state = state
            self.entered[state] += 1
            log.info("runtime state: %s", state.value)

    @property
    def process(self) -> "BaseProcess | None":
        """The engine process (None before :meth:`start`)."""
        return self._process

    def submit(
        self, requests: list[EngineRequest], arrival: float, timeout_s: float
    ) -> RequestStream:
        """Admit ``requests`` (the choices of one HTTP request) or raise a 429/503 APIError.

        The route has checked their number against :attr:`capacity` (naming the field to
        change), before tokenizing them."""
        count = len(requests)
        capacity = self.capacity
        if count > capacity:
            raise ValueError(f"{count} sequences exceed the capacity of {capacity}")
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
        stream = RequestStream(
            [r.request_id for r in requests], deadline=arrival + timeout_s, timeout_s=timeout_s
        )
        stream.start_deadline()
        for index, request in enumerate(requests):
            self._tracked[request.request_id] = _Tracked(stream, index, arrival)
        self._in_flight += count
        self._sent += count
        self._send(AddRequests(requests))
        return stream

    def abort(self, stream: RequestStream, reason: str) -> None:
        """Abort the stream's unfinished sequences (frees their KV blocks); idempotent."""
        stream.cancel_deadline()
        if not stream.done:
            self._abort(stream.request_ids, reason)

    def abort_all(self, reason: str) -> None:
        self._abort(list(self._tracked), reason)

    def close(self) -> None:
        """Stop admitting: every later ``submit`` is a 503 (the drain's first step)."""
        self._closed = True

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called: every ``submit`` is refused."""
        return self._closed

    @property
    def capacity(self) -> int:
        """The most sequences admitted at once: the running batch and the waiting room."""
        return self._max_running + self._max_waiting

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def failure(self) -> str | None:
        """Why the engine stopped serving, or None while it is healthy."""
        return self._failure

    def gauges(self) -> RuntimeGauges:
        return self._gauges

    async def stop(self) -> None:
        """Abort whatever runs, stop the engine process and wait for it to exit."""
        self.close()
        self.abort_all("shutdown")
        self._send(STOP)
        self._disconnect()
        process = self._process
        if process is None:
            return
        await asyncio.to_thread(process.join, ENGINE_STOP_S)
        if process.exitcode is None:
            log.warning("the engine process did not stop in %.0f s; killing it", ENGINE_STOP_S)
            process.kill()
            await asyncio.to_thread(process.join, ENGINE_KILL_S)

    # Receiving.

    def _on_readable(self) -> None:
        """Handle every message the engine has sent (called by the event loop)."""
        conn = self._conn
        try:
            while conn is not None and conn.poll():
                message = conn.recv()
                if isinstance(message, StepReport):
                    self._on_report(message)
                elif isinstance(message, EngineReady):
                    if self._ready is not None and not self._ready.done():
                        self._ready.set_result(message)
                elif isinstance(message, EngineFailed):
                    self._fail(message.message)
                conn = self._conn
        except (EOFError, OSError):
            self._fail(self._exit_reason())

    def _exit_reason(self) -> str:
        process = self._process
        code = process.exitcode if process is not None else None
        if process is not None and code is None:
            process.join(1.0)  # the pipe closed first; the exit status follows at once
            code = process.exitcode
        return (
            f"The engine process exited unexpectedly (exit code {code}); the server must restart."
        )

    def _on_report(self, report: StepReport) -> None:
        now = time.monotonic()
        # Gauges first: a client that has seen an output must not scrape older gauges.
        self._set_state(StandbyState(report.state))
        self._refresh_gauges(report.stats, report.taken)
        for rejection in report.rejections:
            if rejection.invalid:
                error = errors.invalid_request(rejection.message)
            elif rejection.retry:
                error = errors.unavailable(rejection.message, "wake_failed", self._retry_after_s)
            else:
                error = APIError(
                    500,
                    f"The engine could not take the request ({rejection.message}).",
                    type=errors.INTERNAL,
                    code="engine_error",
                )
            self._end(rejection.request_ids, error.code or "engine_refused", error)
        self._route(report.outputs, now)

    def _route(self, rows: list[OutputRow], now: float) -> None:
        metrics = self._metrics
        tracked_by_id = self._tracked
        new_tokens = 0
        for row in rows:
            output = output_from_row(row)
            tracked = tracked_by_id.get(output.request_id)
            if tracked is None:
                continue  # aborted by the server after the engine produced this output
            if output.new_token_ids:
                new_tokens += len(output.new_token_ids)
                if tracked.last_token_at is None:
                    metrics.first_token(now - tracked.arrival, output.num_prompt_tokens)
                else:
                    metrics.inter_token(now - tracked.last_token_at)
                tracked.last_token_at = now
            if output.finished:
                del tracked_by_id[output.request_id]
                self._in_flight -= 1
                if output.finish_reason == "abort":
                    metrics.failed("engine_abort")
                else:
                    metrics.finished(now - tracked.arrival, output.finish_reason or "stop")
            tracked.stream.queue.put_nowait(Update(tracked.index, output))
        if new_tokens:
            metrics.generated(new_tokens)

    # Ending sequences.

    def _abort(self, request_ids: list[str], reason: str) -> None:
        """End the tracked ones among ``request_ids`` now and tell the engine to free them."""
        aborted = self._end(request_ids, reason, None)
        if aborted:
            self._send(AbortRequests(aborted))

    def _end(self, request_ids: list[str], reason: str, error: APIError | None) -> list[str]:
        """Stop tracking ``request_ids`` and end each one's choice (``error``: as a failure)."""
        ended: list[str] = []
        for request_id in request_ids:
            tracked = self._tracked.pop(request_id, None)
            if tracked is None:
                continue
            self._metrics.failed(reason)
            tracked.stream.queue.put_nowait(Update(tracked.index, None, error))
            ended.append(request_id)
        self._in_flight -= len(ended)
        return ended

    def _fail(self, message: str) -> None:
        """The engine is gone: fail every tracked sequence with a 500 and refuse new ones."""
        if self._failure is not None:
            return
        log.error("%s", message)
        self._failure = message
        self._disconnect()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(EngineLoadError(message))
            return
        error = APIError(500, message, type=errors.INTERNAL, code="engine_error")
        self._end(list(self._tracked), "engine_error", error)

    # The pipe.

    def _send(self, command: object) -> None:
        if self._conn is None:
            return
        with contextlib.suppress(OSError):  # the engine process has gone; the reader says so
            self._conn.send(command)

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(RuntimeError):  # the event loop is already closed
            asyncio.get_running_loop().remove_reader(conn.fileno())
        conn.close()

    def _refresh_gauges(self, stats: "EngineStats", taken: int) -> None:
        self._taken = taken
        pending = self._sent - taken  # sent, not yet in the engine's queue
        self._engine_waiting = stats.num_waiting
        parked = self._state in (StandbyState.STANDBY, StandbyState.WAKING)
        weights = 0 if parked else self._weights_bytes
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
            resident_bytes=stats.kv_cache_bytes + weights,
        )
