"""The node agent's pure core: one ledger of tenants per GPU, and every grant, reclaim and lapse.

Data in, decisions out, time passed in explicitly (``now``, seconds on any monotonic clock), no
I/O: the HTTP shell (:mod:`.server`) calls these methods under one lock, maps
:class:`AgentError` to a 4xx/503 body and turns the :class:`Notice` values it drains into
metrics and Kubernetes events. The rules are the protocol's (``berth.agent_protocol``):

- ``granted`` rises only in :meth:`NodeLedger._rebalance` and falls only by the tenant's own
  release (or when its lease ends), so per GPU ``sum(granted) <= allocatable`` and the agent
  never takes back memory a tenant may already have mapped.
- A tenant's *charge* is ``max(granted, held)``: what it may hold, or holds if it misbehaves.
  Free memory is ``allocatable - sum(charge)``; grants come only out of that.
- A tenant is *owed* ``min(want, request) - granted`` when positive. Owed memory comes first;
  while any is owed on a GPU, nothing bursts there, and bursts (granted above request) are
  reclaimed, largest first, until the reclaims in flight cover what is owed.
- During the restart grace (``recovering_until``) nothing is granted at all.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from berth.agent_protocol import (
    GpuView,
    Lease,
    LedgerView,
    Reclaim,
    Register,
    Registration,
    TenantState,
    TenantView,
)


@dataclass(frozen=True)
class GpuMemory:
    """One GPU the agent arbitrates (from NVML or the simulation flag)."""

    uuid: str
    index: int
    name: str
    capacity: int  # bytes: the device's memory
    reserved: int = 0  # bytes kept back from tenants

    @property
    def allocatable(self) -> int:
        return max(0, self.capacity - self.reserved)


@dataclass(frozen=True)
class LeasePolicy:
    heartbeat_interval_s: float = 1.0
    lease_s: float = 10.0  # a tenant silent for longer is dropped
    reclaim_deadline_s: float = 5.0  # how long a tenant has to shrink after a reclaim
    grace_s: float = 10.0  # after the agent starts: no grants, only re-registrations


class AgentError(Exception):
    """A refusal the shell returns to the client (the code decides the HTTP status)."""

    def __init__(
        self, code: str, message: str, field: str | None = None, **detail: int | float | str
    ) -> None:
        super().__init__(message)
        self.code, self.message, self.field, self.detail = code, message, field, detail


# Notices: what happened, for the shell to count, log and report.
@dataclass(frozen=True)
class Notice:
    gpu: str
    tenant: str
    instance: str


@dataclass(frozen=True)
class Lapsed(Notice):
    freed: int  # bytes


@dataclass(frozen=True)
class Replaced(Notice):
    """Another instance of the same tenant registered (the runtime restarted)."""


@dataclass(frozen=True)
class ReclaimIssued(Notice):
    target: int
    deadline_s: float


@dataclass(frozen=True)
class ReclaimOverdue(Notice):
    held: int
    target: int


@dataclass(frozen=True)
class OverGrant(Notice):
    held: int
    granted: int


@dataclass
class Order:
    """An outstanding reclaim: shrink to ``target`` bytes by ``deadline`` (absolute time)."""

    target: int
    deadline: float


@dataclass
class Tenant:
    tenant: str
    instance: str
    gpu: str
    request: int
    limit: int
    granted: int
    held: int
    want: int
    last_seen: float
    seq: int  # admission order: owed memory and bursts are served first come, first served
    pid: int | None = None
    in_flight: int = 0
    reclaim: Order | None = None
    overdue: str | None = None  # "reclaim" or "over_grant" while the tenant misbehaves

    @property
    def charge(self) -> int:
        return max(self.granted, self.held)

    @property
    def owed(self) -> int:
        return max(0, min(self.want, self.request) - self.granted)

    def state(self) -> TenantState:
        if self.overdue:
            return TenantState.OVERDUE
        if self.reclaim:
            return TenantState.RECLAIMING
        if self.owed:
            return TenantState.PENDING
        return TenantState.ACTIVE


@dataclass
class NodeLedger:
    """Every tenant of every GPU on this node. Not thread-safe: the shell holds one lock."""

    gpus: dict[str, GpuMemory]
    epoch: str
    policy: LeasePolicy
    recovering_until: float  # absolute time; no grants before it
    tenants: dict[str, Tenant] = field(default_factory=dict)
    notices: list[Notice] = field(default_factory=list)
    _seq: int = 0

    @classmethod
    def start(
        cls, gpus: Iterable[GpuMemory], epoch: str, policy: LeasePolicy, now: float
    ) -> "NodeLedger":
        """A fresh agent: it cannot know whether tenants survive from a previous one, so it
        always begins with the grace (see the protocol's "Agent restart")."""
        by_uuid = {gpu.uuid: gpu for gpu in gpus}
        return cls(by_uuid, epoch, policy, recovering_until=now + policy.grace_s)

    # --- calls from tenants --------------------------------------------------------------

    def register(self, body: Register, now: float) -> Registration:
        gpu = self.gpus.get(body.gpu_uuid)
        if gpu is None:
            known = ", ".join(self.gpus) or "none"
            raise AgentError(
                "unknown_gpu",
                f"no GPU {body.gpu_uuid!r} on this node (known: {known})",
                field="gpu_uuid",
            )
        old = self.tenants.get(body.tenant)
        if old is not None and old.instance == body.instance:
            asked = (body.gpu_uuid, body.request_bytes, body.limit_bytes)
            if (old.gpu, old.request, old.limit) != asked:
                raise AgentError(
                    "lease_conflict",
                    f"{body.tenant} instance {body.instance} is registered on {old.gpu} with "
                    f"request {old.request} and limit {old.limit}; deregister it first",
                )
            old.pid = body.pid or old.pid
            want = old.want if body.want_bytes is None else body.want_bytes
            return self._registration(self._report(old, body.held_bytes, want, now), now)
        if self.recovering(now) and body.held_bytes == 0:
            retry = self.recovering_until - now
            raise AgentError(
                "recovering",
                f"the node agent restarted and is waiting {retry:.1f} s for its tenants to "
                "re-register before it grants memory; retry then",
                retry_after_s=retry,
            )
        others = [t for t in self._on(gpu.uuid) if t.tenant != body.tenant]
        requested = sum(t.request for t in others)
        if requested + body.request_bytes > gpu.allocatable:
            raise AgentError(
                "request_does_not_fit",
                f"request_bytes {body.request_bytes} does not fit on {gpu.uuid}: "
                f"{requested} of {gpu.allocatable} bytes are already requested",
                field="request_bytes",
                allocatable_bytes=gpu.allocatable,
                requested_bytes=requested,
                request_bytes=body.request_bytes,
            )
        free = gpu.allocatable - sum(t.charge for t in others)
        if body.held_bytes > free:
            raise AgentError(
                "held_exceeds_free",
                f"held_bytes {body.held_bytes} exceeds the {free} bytes free on {gpu.uuid}; "
                "shrink to free_bytes and register again",
                field="held_bytes",
                free_bytes=free,
                held_bytes=body.held_bytes,
            )
        if old is not None:
            self._drop(old)
            self.notices.append(Replaced(old.gpu, old.tenant, old.instance))
        self._seq += 1
        tenant = Tenant(
            tenant=body.tenant,
            instance=body.instance,
            gpu=gpu.uuid,
            request=body.request_bytes,
            limit=body.limit_bytes,
            granted=body.held_bytes,  # what it holds is all it is granted: nothing twice
            held=body.held_bytes,
            want=body.request_bytes if body.want_bytes is None else body.want_bytes,
            last_seen=now,
            seq=self._seq,
            pid=body.pid,
        )
        self.tenants[tenant.tenant] = tenant
        self._rebalance(gpu.uuid, now)
        return self._registration(tenant, now)

    def heartbeat(
        self, name: str, instance: str, held: int, want: int, in_flight: int, now: float
    ) -> Lease:
        tenant = self._lookup(name, instance)
        self._check_within_limit(tenant, held_bytes=held, want_bytes=want)
        tenant.in_flight = in_flight
        return self.lease(self._report(tenant, held, want, now), now)

    def release(self, name: str, instance: str, held: int, want: int | None, now: float) -> Lease:
        """The tenant shrank to ``held``: its grant drops to that (what it still wants, up to
        its request, is owed to it again at once; the rest of its old grant is free)."""
        tenant = self._lookup(name, instance)
        self._check_within_limit(tenant, held_bytes=held, want_bytes=want)
        tenant.granted = min(tenant.granted, held)
        return self.lease(
            self._report(tenant, held, tenant.want if want is None else want, now), now
        )

    def deregister(self, name: str, instance: str, now: float) -> None:
        tenant = self._lookup(name, instance)
        self._drop(tenant)
        self._rebalance(tenant.gpu, now)

    # --- time ----------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Drop lapsed tenants, mark overdue reclaims, and hand out what that freed."""
        for tenant in list(self.tenants.values()):
            if now - tenant.last_seen > self.policy.lease_s:
                self._drop(tenant)
                self.notices.append(
                    Lapsed(tenant.gpu, tenant.tenant, tenant.instance, tenant.charge)
                )
            elif tenant.reclaim and now > tenant.reclaim.deadline and not tenant.overdue:
                tenant.overdue = "reclaim"
                self.notices.append(
                    ReclaimOverdue(
                        tenant.gpu,
                        tenant.tenant,
                        tenant.instance,
                        tenant.held,
                        tenant.reclaim.target,
                    )
                )
        for uuid in self.gpus:
            self._rebalance(uuid, now)

    def recovering(self, now: float) -> bool:
        return now < self.recovering_until

    def drain(self) -> list[Notice]:
        notices, self.notices = self.notices, []
        return notices

    # --- views ---------------------------------------------------------------------------

    def lease(self, tenant: Tenant, now: float) -> Lease:
        return Lease(
            tenant=tenant.tenant,
            instance=tenant.instance,
            gpu_uuid=tenant.gpu,
            agent_epoch=self.epoch,
            state=tenant.state(),
            granted_bytes=tenant.granted,
            reclaim=_reclaim_view(tenant, now),
        )

    def view(self, now: float) -> LedgerView:
        gpus = []
        for gpu in sorted(self.gpus.values(), key=lambda g: g.index):
            tenants = sorted(self._on(gpu.uuid), key=lambda t: t.seq)
            gpus.append(
                GpuView(
                    uuid=gpu.uuid,
                    index=gpu.index,
                    name=gpu.name,
                    capacity_bytes=gpu.capacity,
                    reserved_bytes=gpu.reserved,
                    allocatable_bytes=gpu.allocatable,
                    requested_bytes=sum(t.request for t in tenants),
                    granted_bytes=sum(t.granted for t in tenants),
                    resident_bytes=sum(t.held for t in tenants),
                    free_bytes=self.free(gpu.uuid),
                    tenants=[_tenant_view(t, now) for t in tenants],
                )
            )
        recovering_s = max(0.0, self.recovering_until - now)
        return LedgerView(agent_epoch=self.epoch, recovering_s=recovering_s, gpus=gpus)

    def free(self, uuid: str) -> int:
        return self.gpus[uuid].allocatable - sum(t.charge for t in self._on(uuid))

    # --- internals -----------------------------------------------------------------------

    def _on(self, uuid: str) -> Iterator[Tenant]:
        return (t for t in self.tenants.values() if t.gpu == uuid)

    def _lookup(self, name: str, instance: str) -> Tenant:
        tenant = self.tenants.get(name)
        if tenant is None:
            raise AgentError(
                "unknown_tenant",
                f"no lease for {name!r}: the agent restarted or the lease lapsed; register "
                "again with held_bytes",
                field="tenant",
            )
        if tenant.instance != instance:
            raise AgentError(
                "instance_mismatch",
                f"{name!r} is leased to instance {tenant.instance!r}, not {instance!r}: this "
                "process must stop using the GPU",
                field="instance",
            )
        return tenant

    @staticmethod
    def _check_within_limit(tenant: Tenant, **values: int | None) -> None:
        for key, value in values.items():
            if value is not None and value > tenant.limit:
                raise AgentError(
                    "invalid_value",
                    f"{key} ({value}) exceeds this tenant's limit_bytes ({tenant.limit})",
                    field=key,
                )

    def _report(self, tenant: Tenant, held: int, want: int, now: float) -> Tenant:
        """A tenant said what it holds and wants: update, judge, rebalance its GPU."""
        tenant.held, tenant.want, tenant.last_seen = held, want, now
        if tenant.reclaim and tenant.charge <= tenant.reclaim.target:
            tenant.reclaim = None
            if tenant.overdue == "reclaim":
                tenant.overdue = None
        if held > tenant.granted:
            if tenant.overdue is None:
                tenant.overdue = "over_grant"
                self.notices.append(
                    OverGrant(tenant.gpu, tenant.tenant, tenant.instance, held, tenant.granted)
                )
        elif tenant.overdue == "over_grant":
            tenant.overdue = None  # a reclaim still overdue is marked again by the next tick
        self._rebalance(tenant.gpu, now)
        return tenant

    def _drop(self, tenant: Tenant) -> None:
        del self.tenants[tenant.tenant]

    def _rebalance(self, uuid: str, now: float) -> None:
        """Owed memory first, then reclaims for what is still owed, else bursts."""
        if self.recovering(now):
            return
        tenants = sorted(self._on(uuid), key=lambda t: t.seq)
        free = max(0, self.free(uuid))  # negative only while a tenant holds more than granted
        for tenant in tenants:
            give = min(tenant.owed, free) if not tenant.overdue else 0
            tenant.granted += give
            free -= give
        owed = sum(t.owed for t in tenants if not t.overdue)
        if owed == 0:
            for tenant in tenants:
                if not tenant.overdue:
                    tenant.reclaim = None  # nobody needs it any more
            # An overdue tenant keeps its reclaim, and gets nothing, until it complies.
            for tenant in tenants:
                if tenant.overdue:
                    continue
                give = min(max(0, min(tenant.want, tenant.limit) - tenant.granted), free)
                tenant.granted += give
                free -= give
            return
        coming = sum(t.charge - t.reclaim.target for t in tenants if t.reclaim)
        need = owed - coming
        # Largest burst first: fewest tenants disturbed, and never below anyone's request.
        for tenant in sorted(tenants, key=lambda t: _target(t) - t.request, reverse=True):
            if need <= 0:
                break
            slack = _target(tenant) - tenant.request
            if slack <= 0:
                break
            take = min(slack, need)
            need -= take
            tenant.reclaim = Order(_target(tenant) - take, now + self.policy.reclaim_deadline_s)
            self.notices.append(
                ReclaimIssued(
                    uuid,
                    tenant.tenant,
                    tenant.instance,
                    tenant.reclaim.target,
                    self.policy.reclaim_deadline_s,
                )
            )

    def _registration(self, tenant: Tenant, now: float) -> Registration:
        return Registration(
            **self.lease(tenant, now).model_dump(),
            heartbeat_interval_s=self.policy.heartbeat_interval_s,
            lease_s=self.policy.lease_s,
        )


def _target(tenant: Tenant) -> int:
    """What the tenant is to come down to: its reclaim's target, else what it may hold."""
    return tenant.reclaim.target if tenant.reclaim else tenant.charge


def _reclaim_view(tenant: Tenant, now: float) -> Reclaim | None:
    if tenant.reclaim is None:
        return None
    return Reclaim(target_bytes=tenant.reclaim.target, deadline_s=tenant.reclaim.deadline - now)


def _tenant_view(tenant: Tenant, now: float) -> TenantView:
    return TenantView(
        tenant=tenant.tenant,
        instance=tenant.instance,
        pid=tenant.pid,
        state=tenant.state(),
        request_bytes=tenant.request,
        limit_bytes=tenant.limit,
        granted_bytes=tenant.granted,
        held_bytes=tenant.held,
        want_bytes=tenant.want,
        in_flight=tenant.in_flight,
        reclaim=_reclaim_view(tenant, now),
        last_heartbeat_age_s=now - tenant.last_seen,
    )
