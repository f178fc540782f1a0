"""Leader election: the pure decision (every interleaving of candidates, lost writes, lost replies
and crashes keeps acting windows apart), and the elector against a fake Lease API."""

import threading
import time
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from berth.operator.kube import KubeError, Obj
from berth.operator.leader import (
    LeaderElector,
    LeaseRecord,
    Observed,
    Timing,
    claim,
    decide,
    observe,
    still_leading,
)

TIMING = Timing(lease_duration_s=15, renew_deadline_s=10, retry_period_s=2)


def test_decide_creates_renews_waits_and_takes() -> None:
    assert decide("a", None, 0.0) == "create"
    mine = Observed(LeaseRecord("a", 15), "1", since=0.0)
    assert decide("a", mine, 100.0) == "renew"
    theirs = Observed(LeaseRecord("b", 15), "1", since=10.0)
    assert decide("a", theirs, 24.9) == "wait"
    assert decide("a", theirs, 25.0) == "take"  # unchanged for a whole lease duration
    released = Observed(LeaseRecord("", 1), "2", since=10.0)
    assert decide("a", released, 10.0) == "take"


def test_the_expiry_clock_restarts_only_when_the_record_changes() -> None:
    first = observe(None, LeaseRecord("b", 15, renew_time="t1"), "1", now=0.0)
    same = observe(first, LeaseRecord("b", 15, renew_time="t1"), "2", now=9.0)
    assert same.since == 0.0 and same.resource_version == "2"
    renewed = observe(same, LeaseRecord("b", 15, renew_time="t2"), "3", now=9.5)
    assert renewed.since == 9.5


def test_claim_counts_transitions_and_keeps_the_acquire_time_on_renewal() -> None:
    created = claim("a", None, "create", "t0", TIMING)
    assert (created.holder, created.transitions, created.acquire_time) == ("a", 0, "t0")
    mine = Observed(created, "1", 0.0)
    renewed = claim("a", mine, "renew", "t1", TIMING)
    assert (renewed.acquire_time, renewed.renew_time, renewed.transitions) == ("t0", "t1", 0)
    taken = claim("b", Observed(renewed, "2", 0.0), "take", "t2", TIMING)
    assert (taken.holder, taken.transitions, taken.acquire_time) == ("b", 1, "t2")


def test_a_leader_stops_acting_at_the_renew_deadline() -> None:
    assert still_leading(100.0, 109.9, TIMING)
    assert not still_leading(100.0, 110.0, TIMING)
    assert not still_leading(None, 0.0, TIMING)


# ---- every interleaving -------------------------------------------------------------------


@dataclass
class Candidate:
    identity: str
    observed: Observed | None = None
    renewal_started: float | None = None
    alive: bool = True
    windows: list[tuple[float, float]] = field(default_factory=list)  # [start, end) of acting


@dataclass
class Store:
    """The API server's Lease: writes compare-and-swap on the resourceVersion."""

    record: LeaseRecord | None = None
    version: int = 0


def one_round(c: Candidate, store: Store, now: float, lands: bool, replied: bool) -> None:
    """client-go's tryAcquireOrRenew with the pure core, against the store at time ``now``."""
    if store.record is None:
        c.observed = None
    else:
        c.observed = observe(c.observed, store.record, str(store.version), now)
    decision = decide(c.identity, c.observed, now)
    if decision == "wait":
        c.renewal_started = None
        return
    expected = None if c.observed is None else c.observed.resource_version
    current = None if store.record is None else str(store.version)
    if not lands or expected != current:
        return  # the write was lost or lost the race
    store.record = claim(c.identity, c.observed, decision, str(now), TIMING)
    store.version += 1
    if replied:  # else the write landed but this candidate never learns it
        c.observed = Observed(store.record, str(store.version), now)
        c.renewal_started = now
        c.windows.append((now, now + TIMING.renew_deadline_s))


steps = st.lists(
    st.tuples(
        st.integers(0, 2),  # which candidate
        st.floats(0.0, 9.0),  # seconds that pass first
        st.booleans() | st.just(True),  # the write lands
        st.booleans() | st.just(True),  # its reply arrives
        st.integers(0, 30),  # 0: the candidate crashes and a new process replaces it
    ),
    max_size=80,
)


@settings(max_examples=400, deadline=None)
@given(steps)
def test_no_two_candidates_ever_act_at_the_same_time(schedule: list) -> None:  # type: ignore[type-arg]
    store, now = Store(), 0.0
    candidates = [Candidate(f"c{i}") for i in range(3)]
    retired: list[Candidate] = []
    for index, wait, lands, replied, fate in schedule:
        now += wait
        if fate == 0:
            retired.append(candidates[index])
            candidates[index] = Candidate(f"c{index}-{len(retired)}")
            continue
        one_round(candidates[index], store, now, lands, replied)
    everyone = candidates + retired
    for i, a in enumerate(everyone):
        for b in everyone[i + 1 :]:
            for start_a, end_a in a.windows:
                for start_b, end_b in b.windows:
                    assert end_a <= start_b or end_b <= start_a, (a, b)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 30.0), max_size=5))
def test_a_candidate_that_can_write_leads_within_a_lease_duration(pauses: list[float]) -> None:
    """Whatever an earlier holder did, a candidate retrying every period leads in time."""
    store, now = Store(), 0.0
    old = Candidate("old")
    for pause in pauses:
        now += pause
        one_round(old, store, now, lands=True, replied=True)
    old.alive = False  # crashed
    new = Candidate("new")
    started = now
    while new.renewal_started is None:
        one_round(new, store, now, lands=True, replied=True)
        now += TIMING.retry_period_s
    assert now - started <= TIMING.lease_duration_s + 2 * TIMING.retry_period_s


# ---- the elector against a fake Lease API -------------------------------------------------


class FakeLeases:
    """GET / POST / PUT of one Lease with resourceVersion conflicts, as the API server does."""

    def __init__(self) -> None:
        self.lease: Obj | None = None
        self.version = 0
        self.broken = False
        self.lock = threading.Lock()

    def get(self, path: str, **_: str) -> Obj:
        with self.lock:
            self._check()
            if self.lease is None:
                raise KubeError(404, "NotFound", "leases not found")
            return {**self.lease, "metadata": dict(self.lease["metadata"])}

    def request(self, method: str, path: str, *, body: Obj, **_: object) -> Obj:
        with self.lock:
            self._check()
            if method == "POST" and self.lease is not None:
                raise KubeError(409, "AlreadyExists", "exists")
            if method == "PUT" and body["metadata"].get("resourceVersion") != str(self.version):
                raise KubeError(409, "Conflict", "the object has been modified")
            self.version += 1
            self.lease = {
                **body,
                "metadata": {**body["metadata"], "resourceVersion": str(self.version)},
            }
            return self.lease

    def _check(self) -> None:
        if self.broken:
            raise KubeError(503, "ServiceUnavailable", "etcd is down")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def elector(api: FakeLeases, identity: str, clock: Clock, timing: Timing = TIMING) -> LeaderElector:
    return LeaderElector(api, "berth-system", "berth-operator", identity, timing, clock)  # type: ignore[arg-type]


def test_a_second_elector_waits_out_the_lease_then_takes_it() -> None:
    api, clock = FakeLeases(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    clock.now = 14.0
    assert a.try_acquire_or_renew()  # renewed: b's clock restarts
    clock.now = 20.0
    assert not b.try_acquire_or_renew()  # b first sees a's renewal now, on its own clock
    clock.now = 34.9
    assert not b.try_acquire_or_renew()
    clock.now = 35.0  # unchanged for 15 s since b saw it
    assert b.try_acquire_or_renew()
    assert api.lease is not None and api.lease["spec"]["holderIdentity"] == "b"
    assert api.lease["spec"]["leaseTransitions"] == 1
    assert not a.try_acquire_or_renew()  # a sees b's record now


def test_release_lets_a_follower_take_over_at_once() -> None:
    api, clock = FakeLeases(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    a.release()
    assert api.lease is not None and api.lease["spec"]["holderIdentity"] == ""
    assert b.try_acquire_or_renew()


def test_keep_steps_down_when_renewals_fail_past_the_deadline() -> None:
    api = FakeLeases()
    fast = Timing(lease_duration_s=1.5, renew_deadline_s=0.6, retry_period_s=0.1)
    a = LeaderElector(api, "berth-system", "berth-operator", "a", fast)  # type: ignore[arg-type]
    assert a.acquire()
    lost = threading.Event()
    a.keep(on_lost=lost.set)
    time.sleep(0.5)
    assert not lost.is_set()  # renewing fine
    api.broken = True
    broke = time.monotonic()
    assert lost.wait(2.0)
    assert time.monotonic() - broke <= fast.renew_deadline_s + 0.3
    a.stop.set()


def test_keep_steps_down_at_once_when_another_holds_the_lease() -> None:
    api = FakeLeases()
    fast = Timing(lease_duration_s=1.5, renew_deadline_s=0.6, retry_period_s=0.1)
    a = LeaderElector(api, "berth-system", "berth-operator", "a", fast)  # type: ignore[arg-type]
    assert a.acquire()
    lost = threading.Event()
    a.keep(on_lost=lost.set)
    assert api.lease is not None
    with api.lock:  # an administrator hands the lease to b
        api.lease["spec"]["holderIdentity"] = "b"
        api.version += 1
        api.lease["metadata"]["resourceVersion"] = str(api.version)
    assert lost.wait(0.5)
    a.stop.set()
