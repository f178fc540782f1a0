"""The node-agent protocol, version 1: how a runtime leases GPU memory from ``berth node-agent``.

Torch-free (pydantic only): the node agent (``berth.runtime.agent``) and the runtime's client
both import this module, so the two sides agree on one set of shapes.

Transport
---------
HTTP/1.1 over a unix socket (default ``/run/berth/agent.sock``, env ``BERTH_AGENT_SOCKET``),
JSON bodies, every path under ``/v1/``. Units are bytes and seconds. A tenant is identified by
``tenant`` (the pod's ``namespace/name``, or any unique string for a local ``berth serve``)
plus ``instance`` (a random id per runtime start), so a restarted runtime is a new lease.

Endpoints
---------
- ``POST /v1/tenants`` :class:`Register` -> 200 :class:`Registration`.
  400 bad body or unknown ``gpu_uuid`` (the error names the field); 409 ``request_does_not_fit``
  (the requests on that GPU would exceed it; never for a registration that holds memory, a
  runtime's return after a restart or a lapse), ``held_exceeds_free`` (a registration holds more
  than is free: shrink to ``free_bytes`` in the error's ``detail`` and register again) or
  ``lease_conflict`` (this tenant+instance is registered with another GPU, request or limit);
  503 ``recovering`` (a registration that holds nothing, during the agent's restart grace; retry
  after the ``Retry-After`` header). Registering the same tenant+instance again is idempotent; the same
  tenant with another instance replaces the old lease (the runtime restarted).
- ``POST /v1/tenants/{tenant}/heartbeat`` :class:`Heartbeat` -> 200 :class:`Lease`.
  400 ``held_bytes``/``want_bytes`` above the limit; 404 ``unknown_tenant`` (the agent
  restarted or the lease lapsed: register again with ``held_bytes``); 409 ``instance_mismatch`` (another instance of
  this tenant holds the lease: this process must stop using the GPU).
- ``POST /v1/tenants/{tenant}/release`` :class:`Release` -> 200 :class:`Lease`: the tenant has
  shrunk to ``held_bytes``; its grant drops to that. This is how a reclaim is acknowledged.
- ``GET /v1/tenants/{tenant}/orders?instance=...&wait_s=...`` -> 200 :class:`Lease`: a long
  poll, so that a reclaim or a park order reaches the tenant when it is issued, not at its next
  heartbeat (a wake that must park an idle tenant would otherwise wait up to a heartbeat
  interval for it). Answers as soon as the lease carries a ``reclaim``, else after ``wait_s``
  (at most ``MAX_ORDERS_WAIT_S``). It is not a heartbeat: it reports nothing and keeps no lease
  alive. Errors as for the heartbeat. Optional for clients: one that never calls it still gets
  every order in its heartbeat replies.
- ``DELETE /v1/tenants/{tenant}?instance=...`` -> 204 (clean exit; the grant returns at once).
- ``GET /v1/gpus`` -> :class:`LedgerView` (per GPU: capacity, reserve, every tenant's state).
- ``GET /metrics`` (Prometheus text), ``GET /healthz`` -> :class:`Health`.
Errors are :class:`ErrorResponse` (``{"error": {"code", "message", "field", "detail"}}``).

The memory model (ARCHITECTURE section 4)
-----------------------------------------
Per GPU the agent gives tenants ``capacity - reserved`` bytes (``allocatable``). Each tenant has
a ``request`` (guaranteed) and a ``limit`` (burst ceiling). ``granted`` is what the tenant may
hold right now; it rises only through the agent's replies and falls only through the tenant's
own ``release`` (or when the lease ends), so the agent never takes memory a tenant may already
be using. Invariant: per GPU ``sum(granted) <= allocatable``.

- Admission: a tenant is admitted only if its request fits in ``allocatable`` together with the
  requests of the tenants on its GPU that could not make room: neither parked, nor waking, nor
  idle enough to be parked (see "Warm standby"). Standby tenants may so overcommit a GPU; the
  operator's scheduler bounds that with its overcommit factor. A tenant that registers parked
  (``can_park``, holding and wanting nothing) is always admitted, even during the restart
  grace: it is granted nothing. Its request is then guaranteed: whenever it wants memory up to its request
  (``want_bytes``; a fresh registration wants its request), it gets it from free memory, and if
  there is not enough, the agent reclaims bursts from other tenants, then parks idle ones (below).
  A tenant still below what it is owed is ``pending``: it must not map more than
  ``granted_bytes``, and waits (heartbeating) until ``granted_bytes`` reaches its request.
  Every live, non-parked, admitted tenant keeps at least its request once granted (a waking
  tenant may wait for idle tenants to park, while the GPU is overcommitted).
- Burst: when nobody is owed memory, a tenant that wants more than its grant gets free memory,
  up to ``min(want_bytes, limit_bytes)``. Unused request memory of another tenant counts as
  free: it is lent, and reclaimed when its owner grows back to its request.
- Reclaim: the reply carries ``reclaim = {target_bytes, deadline_s}`` (target >= the tenant's
  request, deadline in seconds from the reply). The tenant shrinks, then calls ``release``.
  Past the deadline it is ``overdue``: reported (metric, Kubernetes event on its pod) and given
  nothing more until it complies. A tenant holding more than its grant is overdue too.
- Warm standby (park): a tenant that registered with ``can_park`` may give back all its GPU
  memory and keep its weights in host RAM. It is ``parked`` while it holds 0, is granted 0 and
  wants 0, by its own choice (a ``release`` with held 0, want 0) or after a park reclaim; its
  request then no longer counts as resident. When a tenant is owed memory (a wake, an admission, growth
  back to its request) and free memory plus reclaimable bursts do not cover it, the agent parks
  the least-recently-used idle tenants: ``can_park``, ``in_flight == 0``, ``idle_s > 0`` (0 means
  busy or still loading), not pending, largest ``idle_s`` first (a tie: the one holding most),
  only as many as needed, never one with requests in flight (a park order is withdrawn when a
  heartbeat reports requests in flight). A park is a reclaim with ``park = true`` and ``target_bytes = 0``: the tenant finishes
  or preempts its sequences, frees weights and KV, then calls ``release`` with held 0, want 0;
  past the deadline it is overdue as above. If parking every parkable tenant would not cover
  what is owed, the owed tenant stays pending (its runtime times out and answers 503).
- Wake: a parked tenant heartbeats (or releases) with ``want_bytes`` >= its request; it is then
  owed its request and pending until granted, as a fresh registration is. On a real GPU the
  agent grants it only once the driver's free memory shows it (the parked tenant's process may
  still be freeing); on simulated GPUs the ledger's numbers stand.
- Lapse: a tenant whose last heartbeat is older than ``lease_s`` is dropped and its grant
  returns (a crashed pod's memory is freed by the driver). A runtime that was stalled that long
  learns it from ``404 unknown_tenant`` and registers again with what it holds.
- Agent restart: the agent keeps no state on disk; it gets a new ``agent_epoch`` and, for
  ``grace_s`` (default ``lease_s``) grants nothing and admits only registrations that hold
  memory (``held_bytes > 0``); each is granted exactly the ``held_bytes`` it already holds.
  Why this is safe: before the restart the grants were disjoint and within ``allocatable``;
  every live tenant calls the agent at least once per ``lease_s`` (rule 2) and retries every
  ``REGISTER_RETRY_S`` (rule 4), so within the grace each one learns of the restart (404) and
  re-registers what it holds; until the grace ends no byte is handed out, so nothing a
  not-yet-re-registered tenant holds (or was granted and may still map) can be granted to
  another. After the grace, a tenant that has not come back is treated as lapsed, exactly as
  without the restart. A tenant that holds nothing risks nothing by waiting out the grace.
  Shortcut: the agent records who holds a lease in a state file on the host's tmpfs (written
  before a registration's reply, so no tenant has a lease the file does not name). A restarted
  agent that finds it ends the grace as soon as every tenant named there has re-registered (at
  once if none), and also admits those tenants' empty re-registrations. Without the file (first
  start since boot, or a restart during a grace that had none) it waits the whole grace.
- Known limit: the agent cannot tell a crashed runtime from one stalled for longer than
  ``lease_s``; it treats both as gone. A stalled runtime must be killed by its liveness probe
  before ``lease_s`` passes, or, on ``404 unknown_tenant``, re-register and shrink if refused.

Client rules (what makes the invariants hold end to end)
--------------------------------------------------------
1. Never hold more than the ``granted_bytes`` of the latest reply; grow only after a reply says so.
2. Heartbeat every ``heartbeat_interval_s``; report ``held_bytes`` truthfully.
3. On a reclaim, shrink to ``target_bytes`` before ``deadline_s`` and call ``release``; on a park
   reclaim, park (free everything) and call ``release`` with held 0, want 0.
4. If the agent is unreachable, keep serving within what you hold, never grow, and retry at least
   every ``REGISTER_RETRY_S``; on ``404 unknown_tenant`` stop growing and register again with
   ``held_bytes`` (what you hold at that moment; your old grant is void).
"""

from enum import StrEnum
from typing import Annotated, Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from berth import wire

PROTOCOL_VERSION: Final = 1
PREFIX: Final = f"/v{PROTOCOL_VERSION}"
DEFAULT_SOCKET: Final = "/run/berth/agent.sock"
ENV_SOCKET: Final = wire.ENV_AGENT_SOCKET
REGISTER_RETRY_S: Final = 1.0  # a runtime without a lease retries at least this often
MAX_ORDERS_WAIT_S: Final = 30.0  # the longest an orders call is held

# Paths, relative to the socket's HTTP root. ``{tenant}`` may contain one "/" (namespace/name).
TENANTS: Final = f"{PREFIX}/tenants"
GPUS: Final = f"{PREFIX}/gpus"
METRICS: Final = "/metrics"
HEALTHZ: Final = "/healthz"


def tenant_path(tenant: str, action: str | None = None) -> str:
    """``/v1/tenants/{tenant}`` or ``/v1/tenants/{tenant}/{action}`` (heartbeat, release,
    orders)."""
    return f"{TENANTS}/{tenant}" + (f"/{action}" if action else "")


# A pod's namespace/name (or any one- or two-segment id for a local server); URL-safe as is.
TenantId = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,252}(/[A-Za-z0-9][A-Za-z0-9._:-]{0,252})?$",
        description="The pod's namespace/name, or any unique one-segment id.",
    ),
]
InstanceId = Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
Bytes = Annotated[int, Field(ge=0, lt=2**63)]


class _Body(BaseModel):
    """Requests are strict: unknown fields and coerced types are errors (400 naming the field)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Register(_Body):
    tenant: TenantId
    instance: InstanceId
    gpu_uuid: str = Field(min_length=1, max_length=96)
    request_bytes: Bytes = Field(gt=0)
    limit_bytes: Bytes = Field(gt=0)
    # What the runtime already holds on this GPU: 0 on a fresh start; after an agent restart (or
    # a lapse) the memory it kept, which the agent grants back as it is.
    held_bytes: Bytes = 0
    # What it would like to hold; None means its request.
    want_bytes: Bytes | None = None
    pid: int | None = Field(None, ge=1)  # shown in the ledger, to match nvidia-smi's processes
    # Supports warm standby: the agent may ask it to park (a reclaim with ``park``).
    can_park: bool = False

    # Field validators (not a model validator), so that the 400 names the offending field.
    @field_validator("limit_bytes")
    @classmethod
    def _limit_covers_request(cls, value: int, info: ValidationInfo) -> int:
        request = info.data.get("request_bytes")
        if request is not None and value < request:
            raise ValueError(f"limit_bytes ({value}) is below request_bytes ({request})")
        return value

    @field_validator("held_bytes", "want_bytes")
    @classmethod
    def _within_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = info.data.get("limit_bytes")
        if value is not None and limit is not None and value > limit:
            raise ValueError(f"{info.field_name} ({value}) exceeds limit_bytes ({limit})")
        return value


class Heartbeat(_Body):
    instance: InstanceId
    held_bytes: Bytes  # resident on the GPU now
    want_bytes: Bytes  # what it would like to hold (<= its limit); drives grants only
    in_flight: int = Field(0, ge=0)  # requests being served: shown in the ledger and metrics
    # Seconds since its last request ended (0 while any is in flight, or while loading): the
    # agent parks the longest-idle tenant first, and never one reporting 0.
    idle_s: float = Field(0.0, ge=0.0, allow_inf_nan=False)


class Release(_Body):
    instance: InstanceId
    held_bytes: Bytes  # what it holds after shrinking; its grant drops to this
    # What it would like to hold from now on; None keeps its last heartbeat's. A runtime that
    # shrinks because it is idle says so here, or the agent may grant the memory straight back.
    want_bytes: Bytes | None = None


class TenantState(StrEnum):
    PENDING = "pending"  # granted less than the request it wants; waiting for free memory
    ACTIVE = "active"
    RECLAIMING = "reclaiming"  # asked to shrink, deadline not yet passed
    OVERDUE = "overdue"  # ignored a reclaim past its deadline, or holds more than granted
    PARKED = "parked"  # a can_park tenant holding 0 and wanting 0 (warm standby)


class Reclaim(BaseModel):
    target_bytes: int  # shrink to at most this (never below the tenant's request, unless parking)
    deadline_s: float  # seconds from this reply; negative once overdue
    park: bool = False  # park: free everything (target 0), then release held 0, want 0


class Lease(BaseModel):
    """The agent's answer to every call of a registered tenant: what it may hold now."""

    tenant: str
    instance: str
    gpu_uuid: str
    agent_epoch: str
    state: TenantState
    granted_bytes: int
    reclaim: Reclaim | None = None


class Registration(Lease):
    heartbeat_interval_s: float
    lease_s: float  # a tenant silent for longer is dropped


class TenantView(BaseModel):
    tenant: str
    instance: str
    pid: int | None
    state: TenantState
    request_bytes: int
    limit_bytes: int
    granted_bytes: int
    held_bytes: int
    want_bytes: int
    in_flight: int
    reclaim: Reclaim | None
    can_park: bool = False
    idle_s: float = 0.0
    last_heartbeat_age_s: float


class GpuView(BaseModel):
    uuid: str
    index: int
    name: str
    capacity_bytes: int  # the device's memory
    reserved_bytes: int  # kept back from tenants (driver, contexts)
    allocatable_bytes: int  # capacity - reserved: what tenants share
    requested_bytes: int
    granted_bytes: int
    resident_bytes: int  # sum of what tenants report holding
    free_bytes: int  # allocatable minus what is granted or held
    tenants: list[TenantView]


class LedgerView(BaseModel):
    agent_epoch: str
    recovering_s: float  # seconds of restart grace left (no grants, only re-registrations)
    gpus: list[GpuView]


class Health(BaseModel):
    status: str
    agent_epoch: str
    protocol_version: int = PROTOCOL_VERSION
    recovering_s: float


class ErrorDetail(BaseModel):
    code: str  # machine-readable: invalid_value, unknown_tenant, request_does_not_fit, ...
    message: str
    field: str | None = None  # the offending field, dotted (``limit_bytes``)
    detail: dict[str, Any] = Field(default_factory=dict)  # numbers behind a refusal


class ErrorResponse(BaseModel):
    error: ErrorDetail
