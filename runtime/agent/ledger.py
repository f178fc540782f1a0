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
- Warm standby: a ``can_park`` tenant holding and wanting nothing is *parked*; its request does
  not count at admission. When reclaims of bursts cannot cover what is owed, idle tenants are
  asked to park (a reclaim to 0 with ``park``), longest idle first, only as many as cover the
  owed tenants that parking can satisfy, first come first served (parking for a tenant that
  would stay pending anyway disturbs an idle one for nothing). A park order is withdrawn as soon
  as its tenant reports requests in flight. A parked tenant that wants memory again is *waking*
  (``standby`` until granted its request); on a real GPU its grants are capped by what the driver
  shows free (``driver_free``, set by the shell), since a parked process may still be freeing.
- During the restart grace (``recovering_until``) nothing is granted at all; it ends early once
  every tenant the previous agent had leased (``awaited``) has re-registered.
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
    park_deadline_s: float = 30.0  # how long a tenant has to park (finish or preempt, free all)
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
class ParkIssued(Notice):
    deadline_s: float


@dataclass(frozen=True)
class Parked(Notice):
    """The tenant holds and wants nothing now (warm standby)."""

    asked: bool  # by the agent's park order, else on its own


@dataclass(frozen=True)
class Resumed(Notice):
    """A parked tenant woke and was granted its request again."""


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
    park: bool = False  # free everything (target 0): warm standby


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
    can_park: bool = False
    idle_s: float = 0.0  # seconds since its last request ended, as of its last heartbeat
    standby: bool = False  # parked, or woken and not yet granted its request

    @property
    def charge(self) -> int:
        return max(self.granted, self.held)

    @property
    def owed(self) -> int:
        return max(0, min(self.want, self.request) - self.granted)

    @property
    def parked(self) -> bool:
        return self.can_park and self.want == 0 and self.charge == 0

    @property
    def parkable(self) -> bool:
        """Idle (nothing in flight, a last request that has ended), resident, and not owed
        anything: what the agent may ask to park. ``idle_s`` 0 means busy or still loading."""
        return (
            self.can_park
            and not self.parked
            and self.in_flight == 0
            and self.idle_s > 0
            and not self.owed
            and not self.overdue
        )

    def state(self) -> TenantState:
        if self.overdue:
            return TenantState.OVERDUE
        if self.parked:
            return TenantState.PARKED
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

    # Per GPU, what the driver shows free (NVML), refreshed by the shell on a real GPU; absent
    # on simulated GPUs, where the ledger's numbers stand.
    driver_free: dict[str, int] = field(default_factory=dict)

    # Tenants the previous agent had leased (from its state file), not yet re-registered.
    awaited: set[str] = field(default_factory=set)
    blind: bool = True  # started without that list: anyone may hold memory until the grace ends

    @classmethod
    def start(
        cls,
        gpus: Iterable[GpuMemory],
        epoch: str,
        policy: LeasePolicy,
        now: float,
        known: Iterable[str] | None = None,
    ) -> "NodeLedger":
        """A fresh agent. ``known``: the tenants the previous agent on this node had leased
        (its state file), or None when that is unknown. Unknown: the full grace (see the
        protocol's "Agent restart"). Known: the grace ends as soon as each of them has
        re-registered (at once when there were none); nothing is granted until then."""
        by_uuid = {gpu.uuid: gpu for gpu in gpus}
        awaited = set(known) if known is not None else set()
        ledger = cls(by_uuid, epoch, policy, recovering_until=now + policy.grace_s)
        ledger.awaited, ledger.blind = awaited, known is None
        if known is not None and not awaited:
            ledger.recovering_until = now
        return ledger

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
        # A tenant that registers parked holds and wants nothing, and its request does not count:
        # it is admitted even during the grace (it is granted nothing until the grace ends).
        parks_itself = body.can_park and body.held_bytes == 0 and body.want_bytes == 0
        recovering = self.recovering(now) and body.held_bytes == 0 and not parks_itself
        if recovering and body.tenant not in self.awaited:
            retry = self.recovering_until - now
            raise AgentError(
                "recovering",
                f"the node agent restarted and is waiting {retry:.1f} s for its tenants to "
                "re-register before it grants memory; retry then",
                retry_after_s=retry,
            )
        others = [t for t in self._on(gpu.uuid) if t.tenant != body.tenant]
        # What stays requested even if every idle tenant parked, not counting parked tenants nor
        # waking ones (not resident yet: they wait for room, they do not hold it). None of it
        # matters to a tenant that registers parked.
        requested = sum(t.request for t in others if not (t.standby or t.parkable))
        # A registration that holds memory is a running runtime's, back after an agent restart
        # or a lapse: its memory is in use whatever the answer, so only what it holds must be
        # free (below). Refusing it for its request would leave that memory unaccounted for
        # (a restarted agent may have admitted an empty registration, a waking tenant's, first).
        admitting = body.held_bytes == 0 and not parks_itself
        if admitting and requested + body.request_bytes > gpu.allocatable:
            raise AgentError(
                "request_does_not_fit",
                f"request_bytes {body.request_bytes} does not fit on {gpu.uuid}: "
                f"{requested} of {gpu.allocatable} bytes are requested by tenants that cannot "
                "park",
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
            can_park=body.can_park,
        )
        self.tenants[tenant.tenant] = tenant
        self._note_parked(tenant, asked=False)
        if self.recovering(now) and self.awaited:
            self.awaited.discard(tenant.tenant)
            if not self.awaited:  # every tenant of the previous agent is back: grants resume
                self.recovering_until = now
                for uuid in self.gpus:
                    self._rebalance(uuid, now)
        self._rebalance(gpu.uuid, now)
        return self._registration(tenant, now)

    def heartbeat(
        self,
        name: str,
        instance: str,
        held: int,
        want: int,
        in_flight: int,
        now: float,
        idle_s: float = 0.0,
    ) -> Lease:
        tenant = self._lookup(name, instance)
        self._check_within_limit(tenant, held_bytes=held, want_bytes=want)
        tenant.in_flight, tenant.idle_s = in_flight, idle_s
        if in_flight and tenant.reclaim and tenant.reclaim.park:
            tenant.reclaim = None  # busy again: never park a tenant with requests in flight
            if tenant.overdue == "reclaim":
                tenant.overdue = None
        return self.lease(self._report(tenant, held, want, now), now)

    def orders(self, name: str, instance: str, now: float) -> Lease:
        """The tenant's lease as it stands, its reclaim or park order included; a read: no
        heartbeat, nothing reported."""
        return self.lease(self._lookup(name, instance), now)

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
        if self.awaited and not self.recovering(now):
            self.awaited.clear()  # not back within the grace: lapsed, as without the restart
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

    def leased(self, now: float) -> list[str] | None:
        """Who holds a lease, or may (awaited during the grace): what the shell persists, so
        that a restarted agent knows whom to wait for. None while that is unknown (a grace
        begun without the previous agent's list): a restart then must wait the full grace."""
        if self.blind and self.recovering(now):
            return None
        return sorted(set(self.tenants) | self.awaited)

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
                    requested_bytes=sum(t.request for t in tenants if not t.parked),
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
        asked = tenant.reclaim is not None and tenant.reclaim.park
        if tenant.reclaim and tenant.charge <= tenant.reclaim.target:
            tenant.reclaim = None
            if tenant.overdue == "reclaim":
                tenant.overdue = None
        self._note_parked(tenant, asked)
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

    def _note_parked(self, tenant: Tenant, asked: bool) -> None:
        if tenant.parked and not tenant.standby:
            tenant.standby = True
            self.notices.append(Parked(tenant.gpu, tenant.tenant, tenant.instance, asked))

    def _drop(self, tenant: Tenant) -> None:
        del self.tenants[tenant.tenant]

    def _rebalance(self, uuid: str, now: float) -> None:
        """Owed memory first, then reclaims for what is still owed (bursts, then parks), else
        bursts."""
        if self.recovering(now):
            return
        tenants = sorted(self._on(uuid), key=lambda t: t.seq)
        free = max(0, self.free(uuid))  # negative only while a tenant holds more than granted
        for tenant in tenants:
            give = min(tenant.owed, free) if not tenant.overdue else 0
            if give and tenant.standby and uuid in self.driver_free:
                # Waking: only what the driver really shows free, beyond grants not yet mapped.
                unmapped = sum(max(0, t.granted - t.held) for t in tenants)
                give = min(give, max(0, self.driver_free[uuid] - unmapped))
            tenant.granted += give
            free -= give
        for tenant in tenants:
            if tenant.standby and not tenant.parked and not tenant.owed:
                tenant.standby = False
                self.notices.append(Resumed(uuid, tenant.tenant, tenant.instance))
        owed_each = [t.owed for t in tenants if t.owed and not t.overdue]
        owed = sum(owed_each)
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
        # Memory still free here was held back from a waking tenant until the driver shows it:
        # it is not needed from anyone else.
        need = owed - coming - free
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
        if need > 0:
            self._park(uuid, tenants, owed_each, owed - need, now)

    def _park(
        self, uuid: str, tenants: list[Tenant], owed_each: list[int], covered: int, now: float
    ) -> None:
        """Ask idle tenants to park, longest idle first (a tie: the one holding most), for the
        owed tenants, in order, whose needs parking can cover beyond ``covered`` (what reclaims
        already bring)."""
        idle = [t for t in tenants if t.parkable and not (t.reclaim and t.reclaim.park)]
        idle.sort(key=lambda t: (-t.idle_s, -_target(t), t.seq))
        can_bring = sum(_target(t) for t in idle)
        need, cumulative = 0, 0
        for amount in owed_each:
            cumulative += amount
            if cumulative - covered > can_bring:
                break
            need = cumulative - covered
        for tenant in idle:
            if need <= 0:
                break
            need -= _target(tenant)
            deadline = self.policy.park_deadline_s
            tenant.reclaim = Order(0, now + deadline, park=True)
            self.notices.append(ParkIssued(uuid, tenant.tenant, tenant.instance, deadline))

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
    return Reclaim(
        target_bytes=tenant.reclaim.target,
        deadline_s=tenant.reclaim.deadline - now,
        park=tenant.reclaim.park,
    )


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
        can_park=tenant.can_park,
        idle_s=tenant.idle_s,
    )
