"""A hypothesis state machine over the node agent's pure core, with simulated runtimes around it.

Each simulated runtime follows the protocol's client rules (it maps at most what its latest
reply granted, heartbeats, and re-registers what it holds after a 404); some are stubborn and
never honour a reclaim. The machine also crashes runtimes, silences them (a stalled runtime is
killed before its lease ends, as a liveness probe would), restarts the agent, and lets time
pass. At every step it checks the invariants against what the runtimes *physically* hold, which
is what "nothing granted twice" means.
"""

from dataclasses import dataclass

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from berth.agent_protocol import Register
from berth.runtime.agent.ledger import AgentError, GpuMemory, LeasePolicy, NodeLedger, Tenant

POLICY = LeasePolicy(heartbeat_interval_s=1.0, lease_s=10.0, reclaim_deadline_s=3.0, grace_s=10.0)
GPUS = (GpuMemory("GPU-a", 0, "sim", 100), GpuMemory("GPU-b", 1, "sim", 64, reserved=4))
# Coarse sizes (with an odd one) make tight packings, and so the interesting cases, likely.
SIZES = st.sampled_from([0, 10, 20, 30, 40, 50, 60, 7])
WANTS = st.sampled_from([0, 10, 30, 50, 70, 100, 120])  # capped at the runtime's limit


@dataclass
class Runtime:
    """One simulated runtime process and what it really holds."""

    tenant: str
    instance: str
    gpu: str
    request: int
    limit: int
    want: int
    stubborn: bool  # never honours a reclaim
    phys: int = 0  # bytes it has mapped
    grant: int = 0  # granted_bytes of its latest reply: the most it may map
    target: int | None = None  # the reclaim target of its latest reply
    registered: bool = False
    alive: bool = True
    silent: bool = False  # stopped calling the agent (hung)
    last_ok: float = 0.0  # time of its latest successful call
    epoch: str = ""  # the agent epoch it registered with


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.epoch = 0
        self.ledger = NodeLedger.start(GPUS, "e0", POLICY, self.now)
        self.now += POLICY.grace_s  # the first agent's grace has passed
        self.runtimes: list[Runtime] = []
        self.count = 0
        self.before: dict[tuple[str, str], int] = {}
        self.releasing: set[str] = set()
        self.overdue: set[tuple[str, str]] = set()
        self.ticked = self.now

    # --- helpers --------------------------------------------------------------------------

    def alive(self) -> list[Runtime]:
        return [r for r in self.runtimes if r.alive]

    def pick(self, index: int) -> Runtime:
        live = self.alive()
        return live[index % len(live)]

    def tenant_of(self, runtime: Runtime) -> Tenant | None:
        tenant = self.ledger.tenants.get(runtime.tenant)
        return tenant if tenant is not None and tenant.instance == runtime.instance else None

    def register(self, runtime: Runtime) -> None:
        body = Register(
            tenant=runtime.tenant,
            instance=runtime.instance,
            gpu_uuid=runtime.gpu,
            request_bytes=runtime.request,
            limit_bytes=runtime.limit,
            held_bytes=runtime.phys,
            want_bytes=max(runtime.want, runtime.phys),
        )
        gpu = self.ledger.gpus[runtime.gpu]
        requested = sum(
            t.request for t in self.ledger.tenants.values()
            if t.gpu == runtime.gpu and t.tenant != runtime.tenant
        )  # fmt: skip
        try:
            reply = self.ledger.register(body, self.now)
        except AgentError as error:
            if error.code == "recovering":
                assert self.ledger.recovering(self.now) and runtime.phys == 0
            elif error.code == "request_does_not_fit" and runtime.phys == 0:
                assert requested + runtime.request > gpu.allocatable
            else:
                # An honest runtime's memory is always free for it: nothing was granted twice.
                raise AssertionError(f"{runtime.tenant} refused: {error.code}: {error}") from error
            return
        assert requested + runtime.request <= gpu.allocatable
        assert reply.granted_bytes >= runtime.phys
        runtime.registered, runtime.last_ok, runtime.epoch = True, self.now, self.ledger.epoch
        runtime.grant = reply.granted_bytes
        runtime.target = reply.reclaim.target_bytes if reply.reclaim else None

    def heartbeat(self, runtime: Runtime) -> None:
        if not runtime.registered:
            self.register(runtime)
            return
        try:
            reply = self.ledger.heartbeat(
                runtime.tenant, runtime.instance, runtime.phys, runtime.want, 0, self.now
            )
        except AgentError as error:
            assert error.code == "unknown_tenant", error.code
            runtime.registered = False
            runtime.grant = runtime.phys  # the old grant is void; keep what is mapped
            self.register(runtime)
            return
        runtime.grant, runtime.last_ok = reply.granted_bytes, self.now
        runtime.target = reply.reclaim.target_bytes if reply.reclaim else None

    def release(self, runtime: Runtime, to: int, want: int | None = None) -> None:
        runtime.phys = min(runtime.phys, to)
        if not runtime.registered or self.tenant_of(runtime) is None:
            self.heartbeat(runtime)
            return
        self.releasing.add(runtime.tenant)
        reply = self.ledger.release(runtime.tenant, runtime.instance, runtime.phys, want, self.now)
        assert reply.granted_bytes >= runtime.phys
        runtime.grant, runtime.last_ok = reply.granted_bytes, self.now
        runtime.target = reply.reclaim.target_bytes if reply.reclaim else None

    # --- rules ----------------------------------------------------------------------------

    @initialize(
        sizes=st.lists(st.tuples(SIZES.filter(bool), SIZES, SIZES), min_size=1, max_size=3),
        stubborn=st.booleans(),
    )
    def busy_gpu(self, sizes: list[tuple[int, int, int]], stubborn: bool) -> None:
        """Start with a few runtimes on one GPU, each holding all it was granted."""
        for request, burst, want_extra in sizes:
            self.start_runtime("GPU-a", request, burst, want_extra, stubborn)
            stubborn = False
        for runtime in self.alive():
            self.heartbeat(runtime)
            runtime.phys = runtime.grant

    @rule(
        gpu=st.sampled_from(["GPU-a", "GPU-a", "GPU-b"]),
        request=SIZES.filter(bool),
        burst=SIZES,
        want_extra=SIZES,
        stubborn=st.booleans(),
    )
    def start_runtime(
        self, gpu: str, request: int, burst: int, want_extra: int, stubborn: bool
    ) -> None:
        self.count += 1
        limit = request + burst
        runtime = Runtime(
            f"ns/pod{self.count}", f"i{self.count}", gpu, request, limit,
            min(limit, request + want_extra), stubborn,
        )  # fmt: skip
        self.runtimes.append(runtime)
        self.register(runtime)
        if not runtime.registered:
            runtime.alive = False  # it never started

    @precondition(lambda self: self.alive())
    @rule(index=st.integers(0, 999))
    def restart_runtime_in_same_pod(self, index: int) -> None:
        """The process exits (its memory is freed) and a new instance registers."""
        old = self.pick(index)
        old.alive, old.phys = False, 0
        self.count += 1
        new = Runtime(
            old.tenant, f"i{self.count}", old.gpu, old.request, old.limit, old.want, old.stubborn
        )
        self.runtimes.append(new)
        self.register(new)
        if not new.registered:
            new.alive = False

    @precondition(lambda self: self.alive())
    @rule(index=st.integers(0, 999), amount=SIZES.filter(bool))
    def grow(self, index: int, amount: int) -> None:
        runtime = self.pick(index)
        if not runtime.silent:
            runtime.phys = min(runtime.grant, runtime.phys + amount)

    @precondition(lambda self: self.alive())
    @rule(index=st.integers(0, 999), want=WANTS, grow=st.booleans())
    def heartbeat_with_new_want(self, index: int, want: int, grow: bool) -> None:
        """Heartbeat; a runtime under load then maps everything it was granted."""
        runtime = self.pick(index)
        if not runtime.silent:
            runtime.want = min(want, runtime.limit)
            self.heartbeat(runtime)
            if grow:
                runtime.phys = runtime.grant

    @precondition(lambda self: self.alive())
    @rule(index=st.integers(0, 999), to=SIZES, idle=st.booleans())
    def shrink_and_release(self, index: int, to: int, idle: bool) -> None:
        """Give memory back: under a reclaim, or (idle) because it wants less from now on."""
        runtime = self.pick(index)
        if not runtime.silent:
            if idle:
                runtime.want = min(runtime.want, to)
            self.release(runtime, to, runtime.want if idle else None)

    @precondition(lambda self: self.alive())
    @rule(index=st.integers(0, 999))
    def comply_with_reclaim(self, index: int) -> None:
        runtime = self.pick(index)
        if not runtime.silent and not runtime.stubborn and runtime.target is not None:
            self.release(runtime, runtime.target)

    @precondition(lambda self: self.alive())
    @rule(index=st.integers(0, 999))
    def crash(self, index: int) -> None:
        runtime = self.pick(index)
        runtime.alive, runtime.phys = False, 0  # the driver frees a dead process's memory

    @precondition(lambda self: self.alive())
    @rule(index=st.integers(0, 999))
    def lose_heartbeats(self, index: int) -> None:
        self.pick(index).silent = True

    @precondition(lambda self: self.alive())
    @rule(index=st.integers(0, 999))
    def exit_cleanly(self, index: int) -> None:
        runtime = self.pick(index)
        if self.tenant_of(runtime) is not None and not runtime.silent:
            self.ledger.deregister(runtime.tenant, runtime.instance, self.now)
        runtime.alive, runtime.phys = False, 0

    @rule(dt=st.floats(0.1, 4.0))
    def time_passes(self, dt: float) -> None:
        """Time passes; every live runtime heartbeats once (a stalled one is killed before its
        lease ends), then the agent ticks."""
        self.now += dt
        for runtime in self.alive():
            if runtime.silent and self.now - runtime.last_ok >= POLICY.lease_s:
                runtime.alive, runtime.phys = False, 0
            elif not runtime.silent:
                self.heartbeat(runtime)
        self.ledger.tick(self.now)
        self.ticked = self.now

    @rule()
    def agent_restarts(self) -> None:
        self.epoch += 1
        self.ledger = NodeLedger.start(GPUS, f"e{self.epoch}", POLICY, self.now)
        self.before = {}

    @rule()
    def everyone_complies(self) -> None:
        """Every live, compliant runtime honours its reclaim: then nobody is owed memory (when
        no tenant in the ledger is dead, silent, stubborn or misbehaving)."""
        for _ in range(3):
            for runtime in self.alive():
                if not runtime.silent and not runtime.stubborn and runtime.target is not None:
                    self.release(runtime, runtime.target)
            for runtime in self.alive():
                if not runtime.silent:
                    self.heartbeat(runtime)
        by_instance = {r.instance: r for r in self.alive()}
        clean = all(
            (r := by_instance.get(t.instance)) is not None and not r.silent and not r.stubborn
            for t in self.ledger.tenants.values()
        )
        if clean and not self.ledger.recovering(self.now):
            owed = {t.tenant: t.owed for t in self.ledger.tenants.values() if t.owed}
            assert not owed, f"still owed after everyone complied: {owed}"

    # --- invariants -----------------------------------------------------------------------

    @invariant()
    def granted_fits_every_gpu(self) -> None:
        for gpu in GPUS:
            granted = sum(t.granted for t in self.ledger.tenants.values() if t.gpu == gpu.uuid)
            assert granted <= gpu.allocatable, (gpu.uuid, granted)

    @invariant()
    def physical_memory_never_oversubscribed(self) -> None:
        for gpu in GPUS:
            held = sum(r.phys for r in self.alive() if r.gpu == gpu.uuid)
            assert held <= gpu.allocatable, (gpu.uuid, held)

    @invariant()
    def every_registered_runtime_holds_within_its_grant(self) -> None:
        for runtime in self.alive():
            tenant = self.tenant_of(runtime)
            if tenant is not None and runtime.registered:
                assert runtime.phys <= tenant.granted, (runtime.tenant, runtime.phys, tenant)

    @invariant()
    def owed_memory_is_free_or_being_reclaimed(self) -> None:
        """Requests are guaranteed: memory owed to a tenant below its request is covered by
        reclaims of other tenants' bursts, and never lent out as a burst meanwhile."""
        if self.ledger.recovering(self.now):
            return
        for gpu in GPUS:
            tenants = [t for t in self.ledger.tenants.values() if t.gpu == gpu.uuid]
            assert sum(t.request for t in tenants) <= gpu.allocatable
            owed = sum(t.owed for t in tenants if not t.overdue)
            if owed:
                assert self.ledger.free(gpu.uuid) <= 0
                coming = sum(t.charge - t.reclaim.target for t in tenants if t.reclaim)
                assert coming >= owed, (gpu.uuid, owed, coming)
            for t in tenants:
                if t.reclaim:
                    assert t.request <= t.reclaim.target < t.charge or t.overdue

    @invariant()
    def grants_fall_only_by_release_and_overdue_tenants_get_nothing(self) -> None:
        now = {(t.tenant, t.instance): t for t in self.ledger.tenants.values()}
        for key, granted in self.before.items():
            tenant = now.get(key)
            if tenant is not None and key[0] not in self.releasing:
                assert tenant.granted >= granted, (key, granted, tenant.granted)
            if tenant is not None and key in self.overdue and tenant.overdue:
                assert tenant.granted <= granted, (key, granted, tenant.granted)
        self.before = {key: t.granted for key, t in now.items()}
        self.overdue = {key for key, t in now.items() if t.overdue}
        self.releasing = set()

    @invariant()
    def live_tenants_keep_their_lease(self) -> None:
        """A runtime that has called within its lease (or is still alive, though silent) is
        never dropped: the agent frees nobody's memory early."""
        for runtime in self.alive():
            if runtime.registered and runtime.epoch == self.ledger.epoch:
                assert self.tenant_of(runtime) is not None, runtime.tenant

    @invariant()
    def lapsed_tenants_are_gone_and_their_memory_returned(self) -> None:
        for tenant in self.ledger.tenants.values():
            assert self.ticked - tenant.last_seen <= POLICY.lease_s, tenant.tenant
        for runtime in self.runtimes:
            if not runtime.alive and self.ticked - runtime.last_ok > POLICY.lease_s:
                assert self.tenant_of(runtime) is None, runtime.tenant


LedgerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestNodeLedgerStateMachine = LedgerMachine.TestCase
