"""A hypothesis state machine over the node agent's pure core, with simulated runtimes around it.

Each simulated runtime follows the protocol's client rules (it maps at most what its latest
reply granted, heartbeats, and re-registers what it holds after a 404); some are stubborn and
never honour a reclaim. Some can park (warm standby): they serve requests and go idle, park on
their own or when asked (holding and wanting nothing), and wake by wanting their request again. The machine also crashes runtimes, silences them (a stalled runtime is
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

from berth.agent_protocol import Lease, Register
from berth.runtime.agent.ledger import (
    AgentError,
    GpuMemory,
    LeasePolicy,
    NodeLedger,
    Tenant,
    _target,
)

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
    can_park: bool = False
    in_flight: int = 0  # requests being served
    idle_s: float = 0.0  # since its last request ended
    parked: bool = False  # weights in host RAM: maps nothing, wants nothing
    park_asked: bool = False  # its latest reply carried a park order


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
            can_park=runtime.can_park,
            pid=None,
        )
        gpu = self.ledger.gpus[runtime.gpu]
        # What stays requested even if every idle tenant parked, without parked or waking
        # tenants; a tenant registering parked (it holds and wants nothing) needs none of it.
        requested = sum(
            t.request for t in self.ledger.tenants.values()
            if t.gpu == runtime.gpu and t.tenant != runtime.tenant and not (t.standby or t.parkable)
        )  # fmt: skip
        if runtime.can_park and runtime.phys == 0 and runtime.want == 0:
            requested = 0
        try:
            reply = self.ledger.register(body, self.now)
        except AgentError as error:
            if error.code == "recovering":
                assert self.ledger.recovering(self.now) and runtime.phys == 0
                assert runtime.tenant not in self.ledger.awaited
            elif error.code == "request_does_not_fit" and runtime.phys == 0:
                assert requested + runtime.request > gpu.allocatable
            else:
                # An honest runtime's memory is always free for it: nothing was granted twice.
                raise AssertionError(f"{runtime.tenant} refused: {error.code}: {error}") from error
            return
        if runtime.phys == 0:  # a runtime holding memory is back, not admitted anew
            assert requested + runtime.request <= gpu.allocatable
        assert reply.granted_bytes >= runtime.phys
        runtime.registered, runtime.last_ok, runtime.epoch = True, self.now, self.ledger.epoch
        self.took(runtime, reply)

    def took(self, runtime: Runtime, reply: Lease) -> None:
        """The runtime reads a reply: what it may map, and any reclaim or park order."""
        runtime.grant = reply.granted_bytes
        runtime.target = reply.reclaim.target_bytes if reply.reclaim else None
        runtime.park_asked = reply.reclaim is not None and reply.reclaim.park
        if runtime.park_asked:  # never a tenant with requests in flight, or one that can't
            assert runtime.can_park and runtime.in_flight == 0, runtime
            assert reply.reclaim is not None and reply.reclaim.target_bytes == 0

    def heartbeat(self, runtime: Runtime) -> None:
        if not runtime.registered:
            self.register(runtime)
            return
        try:
            reply = self.ledger.heartbeat(
                runtime.tenant, runtime.instance, runtime.phys, runtime.want, runtime.in_flight,
                self.now, idle_s=runtime.idle_s,
            )  # fmt: skip
        except AgentError as error:
            assert error.code == "unknown_tenant", error.code
            runtime.registered = False
            runtime.grant = runtime.phys  # the old grant is void; keep what is mapped
            self.register(runtime)
            return
        runtime.last_ok = self.now
        self.took(runtime, reply)

    def release(self, runtime: Runtime, to: int, want: int | None = None) -> None:
        runtime.phys = min(runtime.phys, to)
        if not runtime.registered or self.tenant_of(runtime) is None:
            self.heartbeat(runtime)
            return
        self.releasing.add(runtime.tenant)
        reply = self.ledger.release(runtime.tenant, runtime.instance, runtime.phys, want, self.now)
        assert reply.granted_bytes >= runtime.phys
        runtime.last_ok = self.now
        self.took(runtime, reply)

    def park(self, runtime: Runtime) -> None:
        """Give everything back and say so: held 0, want 0."""
        runtime.parked, runtime.want, runtime.in_flight = True, 0, 0
        self.release(runtime, 0, 0)

    # --- rules ----------------------------------------------------------------------------

    @initialize(
        sizes=st.lists(
            st.tuples(SIZES.filter(bool), SIZES, SIZES, st.booleans()), min_size=1, max_size=3
        ),
        stubborn=st.booleans(),
        idle=st.lists(st.sampled_from([0.0, 2.0, 20.0]), min_size=3, max_size=3),
        park_first=st.booleans(),
    )
    def busy_gpu(
        self,
        sizes: list[tuple[int, int, int, bool]],
        stubborn: bool,
        idle: list[float],
        park_first: bool,
    ) -> None:
        """Start with a few runtimes on one GPU, each holding all it was granted (and maybe
        the first that can park parked already)."""
        for request, burst, want_extra, can_park in sizes:
            self.start_runtime("GPU-a", request, burst, want_extra, stubborn, can_park)
            stubborn = False
        for runtime, idle_s in zip(self.alive(), idle, strict=False):
            runtime.idle_s = idle_s
            self.heartbeat(runtime)
            runtime.phys = runtime.grant
        if park_first and (standby := self.able(parked=False)):
            self.park(standby[0])

    @rule(
        gpu=st.sampled_from(["GPU-a", "GPU-a", "GPU-b"]),
        request=SIZES.filter(bool),
        burst=SIZES,
        want_extra=SIZES,
        stubborn=st.booleans(),
        can_park=st.booleans(),
    )
    def start_runtime(
        self, gpu: str, request: int, burst: int, want_extra: int, stubborn: bool, can_park: bool
    ) -> None:
        self.count += 1
        limit = request + burst
        runtime = Runtime(
            f"ns/pod{self.count}", f"i{self.count}", gpu, request, limit,
            min(limit, request + want_extra), stubborn, can_park=can_park,
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
            old.tenant, f"i{self.count}", old.gpu, old.request, old.limit, old.want, old.stubborn,
            can_park=old.can_park, parked=old.parked,
        )  # fmt: skip
        self.runtimes.append(new)
        self.register(new)
        if not new.registered:
            new.alive = False

    @precondition(lambda self: self.alive())
    @rule(index=st.integers(0, 999), amount=SIZES.filter(bool))
    def grow(self, index: int, amount: int) -> None:
        runtime = self.pick(index)
        if not runtime.silent and not runtime.parked:
            runtime.phys = min(runtime.grant, runtime.phys + amount)

    @precondition(lambda self: self.alive())
    @rule(index=st.integers(0, 999), want=WANTS, grow=st.booleans())
    def heartbeat_with_new_want(self, index: int, want: int, grow: bool) -> None:
        """Heartbeat; a runtime under load then maps everything it was granted."""
        runtime = self.pick(index)
        if not runtime.silent and not runtime.parked:
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
            if runtime.park_asked:
                self.park(runtime)
            else:
                self.release(runtime, runtime.target)

    @precondition(lambda self: self.alive())
    @rule(
        index=st.integers(0, 999),
        in_flight=st.sampled_from([0, 0, 0, 1, 3]),
        idle_s=st.sampled_from([0.0, 1.0, 5.0, 30.0]),
    )
    def traffic(self, index: int, in_flight: int, idle_s: float) -> None:
        """Requests come and go; a parked runtime that gets one wakes (next rule)."""
        runtime = self.pick(index)
        if not runtime.silent and not runtime.parked:
            runtime.in_flight, runtime.idle_s = in_flight, 0.0 if in_flight else idle_s
            self.heartbeat(runtime)

    def able(self, parked: bool) -> list[Runtime]:
        return [
            r for r in self.alive() if r.can_park and r.parked == parked and not r.silent
        ]  # fmt: skip

    @precondition(lambda self: self.able(parked=False))
    @rule(index=st.integers(0, 999))
    def park_on_its_own(self, index: int) -> None:
        runtimes = self.able(parked=False)
        self.park(runtimes[index % len(runtimes)])

    @precondition(lambda self: self.able(parked=True))
    @rule(index=st.integers(0, 999), in_flight=st.sampled_from([0, 1]), grow=st.booleans())
    def wake(self, index: int, in_flight: int, grow: bool) -> None:
        """A parked runtime wants its request back (a request arrived, or an operator asked);
        it maps only what the replies grant."""
        runtimes = self.able(parked=True)
        runtime = runtimes[index % len(runtimes)]
        runtime.parked, runtime.want, runtime.in_flight = False, runtime.request, in_flight
        runtime.idle_s = 0.0
        self.heartbeat(runtime)
        if grow:
            runtime.phys = runtime.grant

    @precondition(lambda self: self.able(parked=True))
    @rule(index=st.integers(0, 999), can_park=st.booleans(), in_flight=st.sampled_from([0, 1]))
    def another_takes_the_room_then_the_parked_one_wakes(
        self, index: int, can_park: bool, in_flight: int
    ) -> None:
        """The case warm standby is for: a newcomer fills what a parked tenant gave back, and
        then the parked one wants its request again (it waits for idle tenants to park)."""
        runtimes = self.able(parked=True)
        parked = runtimes[index % len(runtimes)]
        free = self.ledger.free(parked.gpu)
        if free > 0:
            self.start_runtime(parked.gpu, free, 0, 0, False, can_park)
            newcomer = self.runtimes[-1]
            if newcomer.alive:
                newcomer.phys = newcomer.grant
        self.time_passes(2.0)  # the others idle a while
        if parked.alive and parked.parked:
            parked.parked, parked.want, parked.in_flight = False, parked.request, in_flight
            parked.idle_s = 0.0
            self.heartbeat(parked)
            parked.phys = parked.grant

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
        """Time passes (idle runtimes idle longer); every live runtime heartbeats once (a
        stalled one is killed before its lease ends), then the agent ticks."""
        self.now += dt
        for runtime in self.alive():
            if runtime.in_flight == 0 and not runtime.parked:
                runtime.idle_s += dt
            if runtime.silent and self.now - runtime.last_ok >= POLICY.lease_s:
                runtime.alive, runtime.phys = False, 0
            elif not runtime.silent:
                self.heartbeat(runtime)
        self.ledger.tick(self.now)
        self.ticked = self.now

    @rule(state_file=st.booleans())
    def agent_restarts(self, state_file: bool) -> None:
        """The agent restarts, with or without the state file naming its tenants."""
        self.epoch += 1
        known = self.ledger.leased(self.now) if state_file else None
        self.ledger = NodeLedger.start(GPUS, f"e{self.epoch}", POLICY, self.now, known)
        self.before = {}

    @precondition(lambda self: self.alive())
    @rule(state_file=st.booleans(), index=st.integers(0, 999), want=WANTS)
    def agent_restarts_and_one_tenant_returns_first(
        self, state_file: bool, index: int, want: int
    ) -> None:
        """The interleaving that matters: one runtime is back (wanting more and mapping what
        it gets) while the others still hold memory the new agent has not heard of."""
        self.agent_restarts(state_file)
        self.heartbeat_with_new_want(index, want, grow=True)

    @rule()
    def everyone_complies(self) -> None:
        """Every live, compliant runtime honours its reclaim: then nobody is owed memory (when
        no tenant in the ledger is dead, silent, stubborn or misbehaving)."""
        for _ in range(3):
            for runtime in self.alive():
                if not runtime.silent and not runtime.stubborn and runtime.target is not None:
                    if runtime.park_asked:
                        self.park(runtime)
                    else:
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
            # Owed memory that parking could not cover may wait (waking tenants on a GPU whose
            # other tenants are busy); every other need is met.
            owed = {
                t.tenant: t.owed for t in self.ledger.tenants.values()
                if t.owed and not self.waits_for_busy_tenants(t.gpu)
            }  # fmt: skip
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

    def waits_for_busy_tenants(self, uuid: str) -> bool:
        """Some tenant on the GPU is owed more than reclaims and parks can bring (the
        non-parked requests overcommit it since a wake, or a newcomer waits for idle ones)."""
        tenants = [t for t in self.ledger.tenants.values() if t.gpu == uuid]
        owed = sum(t.owed for t in tenants if not t.overdue)
        coming = sum(t.charge - t.reclaim.target for t in tenants if t.reclaim)
        return owed > 0 and coming < owed

    @invariant()
    def owed_memory_is_free_or_being_reclaimed(self) -> None:
        """Requests are guaranteed: memory owed to a tenant below its request is covered by
        reclaims of other tenants' bursts and by parks of idle tenants, and never lent out as
        a burst meanwhile; it is short only when even parking every idle tenant would not
        cover it, and then nobody is asked to park for nothing."""
        if self.ledger.recovering(self.now):
            return
        for gpu in GPUS:
            tenants = [t for t in self.ledger.tenants.values() if t.gpu == gpu.uuid]
            assert sum(t.request for t in tenants if not t.can_park) <= gpu.allocatable
            owed = sum(t.owed for t in tenants if not t.overdue)
            if owed:
                assert self.ledger.free(gpu.uuid) <= 0
                coming = sum(t.charge - t.reclaim.target for t in tenants if t.reclaim)
                idle = sum(
                    _target(t) for t in tenants
                    if t.parkable and not (t.reclaim and t.reclaim.park)
                )  # fmt: skip
                assert coming >= owed or coming + idle < owed, (gpu.uuid, owed, coming, idle)
            for t in tenants:
                if t.reclaim and t.reclaim.park:
                    assert t.reclaim.target == 0 and (t.charge > 0 or t.overdue)
                    assert t.in_flight == 0 and t.can_park  # never one serving requests
                elif t.reclaim:
                    assert t.request <= t.reclaim.target < t.charge or t.overdue

    @invariant()
    def parked_tenants_hold_nothing(self) -> None:
        for runtime in self.alive():
            tenant = self.tenant_of(runtime)
            if tenant is not None and tenant.parked:
                assert runtime.phys == 0 and tenant.granted == 0, runtime
                assert tenant.state().value == "parked"

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


LedgerMachine.TestCase.settings = settings(max_examples=400, stateful_step_count=30, deadline=None)
TestNodeLedgerStateMachine = LedgerMachine.TestCase
