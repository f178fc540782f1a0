"""The node agent's HTTP shell: the protocol's endpoints on a unix socket, around the ledger.

Every call takes the one lock, reads the clock once (and, on a real GPU, what the driver shows
free), runs one ledger method and drains its notices into metrics, logs and (in a cluster)
events and standby annotations on the tenants' pods. A ticker does the
same with :meth:`NodeLedger.tick` a few times per heartbeat interval, so lapses and overdue
reclaims are noticed even when nobody calls. Client mistakes are 4xx bodies naming the field.
"""

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, TypeVar

from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from berth.agent_protocol import (
    GPUS,
    HEALTHZ,
    MAX_ORDERS_WAIT_S,
    METRICS,
    PROTOCOL_VERSION,
    TENANTS,
    ErrorDetail,
    ErrorResponse,
    Health,
    Heartbeat,
    InstanceId,
    Lease,
    LedgerView,
    Register,
    Registration,
    Release,
)
from berth.runtime.agent.ledger import (
    AgentError,
    Lapsed,
    NodeLedger,
    Notice,
    OverGrant,
    Parked,
    ParkIssued,
    ReclaimIssued,
    ReclaimOverdue,
    Replaced,
    Resumed,
)
from berth.runtime.agent.metrics import AgentMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")

STATUS = {
    "invalid_value": 400,
    "unknown_gpu": 400,
    "unknown_tenant": 404,
    "request_does_not_fit": 409,
    "held_exceeds_free": 409,
    "lease_conflict": 409,
    "instance_mismatch": 409,
    "recovering": 503,
}

Reporter = Callable[[str, str, str], None]  # (tenant, reason, message): an event on its pod
Annotator = Callable[[str, bool], None]  # (tenant, standby): the standby annotation on its pod


class Agent:
    """The ledger behind one lock, with the clock and what to do with each notice."""

    def __init__(
        self,
        ledger: NodeLedger,
        report: Reporter | None = None,
        clock: Callable[[], float] = time.monotonic,
        state_file: Path | None = None,
        annotate: Annotator | None = None,
        driver_free: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self.ledger, self.report, self.clock = ledger, report, clock
        self.annotate, self.driver_free = annotate, driver_free
        self.state_file = state_file
        self.persisted: list[str] | None = None
        self.lock = threading.Lock()
        # Orders long polls waiting, per tenant (set on the event loop, from any thread).
        self.loop: asyncio.AbstractEventLoop | None = None
        self.order_waiters: dict[str, asyncio.Event] = {}
        self.closing = False  # shutting down: answer every orders poll now
        self.metrics = AgentMetrics(lambda: self.call(lambda ledger, now: ledger.view(now)))

    def call(self, operation: Callable[[NodeLedger, float], T]) -> T:
        notices: list[Notice] = []
        try:
            with self.lock:
                try:
                    if self.driver_free is not None:
                        self.ledger.driver_free = self.driver_free()
                    return operation(self.ledger, self.clock())
                finally:
                    notices = self.ledger.drain()
                    self._persist()  # before the reply leaves: write-ahead
        finally:
            for notice in notices:  # outside the lock: reporting logs and queues
                self._handle(notice)

    def _persist(self) -> None:
        """Record who holds a lease, so that a restarted agent knows whom to wait for (see
        :func:`read_state`). Written before a registration's reply: a tenant the file does
        not name has no lease yet."""
        leased = self.ledger.leased(self.clock())
        if self.state_file is None or (leased is not None and leased == self.persisted):
            return
        if leased is None:  # unknown who holds memory: a restart now must wait the full grace
            self.state_file.unlink(missing_ok=True)
            self.persisted = None
            return
        temporary = self.state_file.with_suffix(".tmp")
        with temporary.open("w") as out:
            json.dump({"agent_epoch": self.ledger.epoch, "tenants": leased}, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.state_file)
        self.persisted = leased

    def close_polls(self) -> None:
        """Shutting down: answer the waiting orders polls at once (the server drains its
        connections before it exits, and a poll would hold it for up to its ``wait_s``)."""
        self.closing = True
        for tenant in list(self.order_waiters):
            self._wake_orders(tenant)

    def _wake_orders(self, tenant: str) -> None:
        """An order was issued to ``tenant``: answer its orders long poll now."""
        event, loop = self.order_waiters.get(tenant), self.loop
        if event is not None and loop is not None:
            loop.call_soon_threadsafe(event.set)

    async def orders(self, tenant: str, instance: str, wait_s: float) -> Lease:
        """The tenant's lease once it carries a reclaim, or after ``wait_s``."""
        event = self.order_waiters.setdefault(tenant, asyncio.Event())
        deadline = time.monotonic() + wait_s
        try:
            while True:
                event.clear()  # before reading: an order issued after the read sets it again
                lease = self.call(lambda ledger, now: ledger.orders(tenant, instance, now))
                remaining = deadline - time.monotonic()
                if lease.reclaim is not None or remaining <= 0 or self.closing:
                    return lease
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), remaining)
        finally:
            if self.order_waiters.get(tenant) is event:
                del self.order_waiters[tenant]

    def _handle(self, notice: Notice) -> None:
        self.metrics.count(notice)
        if isinstance(notice, ReclaimIssued | ParkIssued):
            self._wake_orders(notice.tenant)
        who = f"{notice.tenant} ({notice.instance}) on {notice.gpu}"
        match notice:
            case ReclaimIssued():
                log.info("reclaim: %s to shrink to %d bytes within %.1f s", who,
                         notice.target, notice.deadline_s)  # fmt: skip
            case ReclaimOverdue():
                message = (
                    f"ignored a reclaim: holds {notice.held} bytes, was asked to shrink to "
                    f"{notice.target} on GPU {notice.gpu}; it gets no new GPU memory until it does"
                )
                log.warning("%s %s", who, message)
                if self.report:
                    self.report(notice.tenant, "GpuReclaimOverdue", message)
            case OverGrant():
                message = (
                    f"holds {notice.held} bytes of GPU {notice.gpu} but was granted "
                    f"{notice.granted}; it gets no new GPU memory until it is back within its grant"
                )
                log.warning("%s %s", who, message)
                if self.report:
                    self.report(notice.tenant, "GpuMemoryOverGrant", message)
            case ParkIssued():
                log.info("park: %s asked to park within %.1f s", who, notice.deadline_s)
            case Parked():
                log.info("parked: %s (%s)", who, "asked" if notice.asked else "on its own")
                if self.annotate:
                    self.annotate(notice.tenant, True)
            case Resumed():
                log.info("resumed: %s was granted its request again", who)
                if self.annotate:
                    self.annotate(notice.tenant, False)
            case Lapsed():
                log.warning("lapsed: %s stopped heartbeating; %d bytes freed", who, notice.freed)
            case Replaced():
                log.info("replaced: %s re-registered with a new instance", who)


def read_state(path: Path) -> list[str] | None:
    """The tenants the previous agent had leased, or None if unknown (no file: first start
    since boot, as the file lives on the host's tmpfs; unreadable: trust nothing)."""
    try:
        state = json.loads(path.read_text())
        tenants = state["tenants"]
        if not isinstance(tenants, list) or not all(isinstance(t, str) for t in tenants):
            raise ValueError("tenants is not a list of names")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("ignoring unreadable state file %s (%s): full restart grace", path, error)
        return None
    return tenants


def _error(status: int, detail: ErrorDetail, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        ErrorResponse(error=detail).model_dump(), status_code=status, headers=headers
    )


def _field(loc: tuple[int | str, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or None


def install_errors(app: FastAPI) -> None:
    async def agent_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, AgentError)
        headers = None
        if "retry_after_s" in exc.detail:
            headers = {"Retry-After": str(max(1, round(float(exc.detail["retry_after_s"]))))}
        detail = ErrorDetail(code=exc.code, message=exc.message, field=exc.field,
                             detail=exc.detail)  # fmt: skip
        return _error(STATUS.get(exc.code, 400), detail, headers)

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        field = _field(tuple(first["loc"]))
        if first["type"] == "json_invalid":
            return _error(400, ErrorDetail(code="invalid_json", message=str(first["msg"])))
        where = f"{field}: " if field else ""
        reason = str(first["msg"]).removeprefix("Value error, ")
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        message = f"{where}{reason}{more}"
        return _error(400, ErrorDetail(code="invalid_value", message=message, field=field))

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = "not_found" if exc.status_code == 404 else "invalid_request"
        return _error(exc.status_code, ErrorDetail(code=code, message=str(exc.detail)))

    app.add_exception_handler(AgentError, agent_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


def create_app(agent: Agent, tick_s: float) -> FastAPI:
    """The protocol's endpoints (``berth.agent_protocol``) over ``agent``."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async def ticker() -> None:
            while True:
                await asyncio.sleep(tick_s)
                agent.call(lambda ledger, now: ledger.tick(now))

        agent.loop = asyncio.get_running_loop()
        task = asyncio.create_task(ticker())
        yield
        task.cancel()

    app = FastAPI(title="Berth node agent", version=str(PROTOCOL_VERSION), lifespan=lifespan)
    install_errors(app)

    @app.post(TENANTS)
    def register(body: Register) -> Registration:
        return agent.call(lambda ledger, now: ledger.register(body, now))

    @app.post(TENANTS + "/{tenant:path}/heartbeat")
    def heartbeat(tenant: str, body: Heartbeat) -> Lease:
        return agent.call(
            lambda ledger, now: ledger.heartbeat(
                tenant,
                body.instance,
                body.held_bytes,
                body.want_bytes,
                body.in_flight,
                now,
                idle_s=body.idle_s,
            )
        )

    @app.get(TENANTS + "/{tenant:path}/orders")
    async def orders(
        tenant: str,
        instance: Annotated[InstanceId, Query()],
        wait_s: Annotated[float, Query(ge=0.0, le=MAX_ORDERS_WAIT_S, allow_inf_nan=False)] = 0.0,
    ) -> Lease:
        return await agent.orders(tenant, instance, wait_s)

    @app.post(TENANTS + "/{tenant:path}/release")
    def release(tenant: str, body: Release) -> Lease:
        return agent.call(
            lambda ledger, now: ledger.release(
                tenant, body.instance, body.held_bytes, body.want_bytes, now
            )
        )

    @app.delete(TENANTS + "/{tenant:path}", status_code=204)
    def deregister(tenant: str, instance: Annotated[InstanceId, Query()]) -> Response:
        agent.call(lambda ledger, now: ledger.deregister(tenant, instance, now))
        return Response(status_code=204)

    @app.get(GPUS)
    def gpus() -> LedgerView:
        return agent.call(lambda ledger, now: ledger.view(now))

    @app.get(HEALTHZ)
    def healthz() -> Health:
        view = agent.call(lambda ledger, now: ledger.view(now))
        return Health(status="ok", agent_epoch=view.agent_epoch, recovering_s=view.recovering_s)

    @app.get(METRICS)
    def metrics() -> Response:
        return Response(generate_latest(agent.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
