"""Warm standby in the ledger, one named scenario per rule (the state machine beside this file
checks them at random): who is asked to park, when nobody is, and how a parked tenant wakes."""

import pytest

from berth.agent_protocol import Register, TenantState
from berth.runtime.agent.ledger import (
    AgentError,
    GpuMemory,
    LeasePolicy,
    NodeLedger,
    Parked,
    ParkIssued,
    Resumed,
)

POLICY = LeasePolicy(heartbeat_interval_s=1.0, lease_s=10.0, reclaim_deadline_s=2.0, grace_s=10.0)


def ledger() -> NodeLedger:
    node = NodeLedger.start([GpuMemory("G", 0, "sim", 100)], "e1", POLICY, now=0.0)
    node.recovering_until = 0.0  # past its start-up grace
    return node


def register(node: NodeLedger, name: str, request: int, can_park: bool = True,
             want: int | None = None, now: float = 1.0) -> int:  # fmt: skip
    body = Register(tenant=name, instance="i", gpu_uuid="G", request_bytes=request,
                    limit_bytes=request, want_bytes=want, can_park=can_park, pid=None)  # fmt: skip
    return node.register(body, now).granted_bytes


def idle(node: NodeLedger, name: str, idle_s: float, in_flight: int = 0, now: float = 2.0) -> None:
    """A resident tenant heartbeats holding its request."""
    t = node.tenants[name]
    node.heartbeat(name, "i", t.request, t.request, in_flight, now, idle_s=idle_s)


def park_orders(node: NodeLedger) -> list[str]:
    return sorted(n for n, t in node.tenants.items() if t.reclaim and t.reclaim.park)


def full_gpu_with_a_parked_tenant() -> NodeLedger:
    """a (30, parked), x (30, cannot park) took its place, b and c (30 and 40) idle."""
    node = ledger()
    register(node, "a", 30)
    register(node, "b", 30)
    register(node, "c", 40)
    node.release("a", "i", held=0, want=0, now=1.5)
    assert node.tenants["a"].state() == TenantState.PARKED
    register(node, "x", 30, can_park=False)  # a's request no longer counts: x fits
    assert node.tenants["x"].granted == 30 and node.free("G") == 0
    for name in ("b", "c", "x"):
        idle(node, name, 0.0)
    node.drain()
    return node


def test_a_wake_parks_the_longest_idle_tenant_only_and_the_parked_one_wakes() -> None:
    node = full_gpu_with_a_parked_tenant()
    idle(node, "b", idle_s=10.0)
    idle(node, "c", idle_s=30.0)
    woke = node.heartbeat("a", "i", 0, 30, 0, now=3.0)
    assert woke.state == TenantState.PENDING and woke.granted_bytes == 0
    assert park_orders(node) == ["c"]  # c alone covers a's 30; b is left alone
    lease = node.heartbeat("c", "i", 40, 40, 0, now=3.5, idle_s=31.0)
    assert lease.reclaim is not None and lease.reclaim.park and lease.reclaim.target_bytes == 0
    assert [type(n) for n in node.drain()] == [ParkIssued]
    parked = node.release("c", "i", held=0, want=0, now=4.0)
    assert parked.state == TenantState.PARKED and parked.granted_bytes == 0
    assert node.tenants["a"].granted == 30 and node.tenants["a"].state() == TenantState.ACTIVE
    notices = node.drain()
    assert [(type(n), n.tenant) for n in notices] == [(Parked, "c"), (Resumed, "a")]
    assert notices[0].asked  # type: ignore[attr-defined]


def test_a_tenant_with_requests_in_flight_is_never_asked_to_park() -> None:
    node = full_gpu_with_a_parked_tenant()
    idle(node, "b", idle_s=10.0)
    idle(node, "c", idle_s=0.0, in_flight=3)  # busy: not a candidate, however large
    node.heartbeat("a", "i", 0, 30, 0, now=3.0)
    assert park_orders(node) == ["b"]


def test_a_park_order_is_withdrawn_when_requests_arrive_and_another_is_asked() -> None:
    node = full_gpu_with_a_parked_tenant()
    idle(node, "b", idle_s=10.0)
    idle(node, "c", idle_s=30.0)
    node.heartbeat("a", "i", 0, 30, 0, now=3.0)
    assert park_orders(node) == ["c"]
    lease = node.heartbeat("c", "i", 40, 40, 1, now=3.5)  # a request arrived meanwhile
    assert lease.reclaim is None and lease.state == TenantState.ACTIVE
    assert park_orders(node) == ["b"]


def test_a_wake_that_parking_cannot_cover_stays_pending_and_disturbs_nobody() -> None:
    node = ledger()
    register(node, "a", 50)
    register(node, "b", 30)
    register(node, "c", 20)
    node.release("a", "i", held=0, want=0, now=1.5)
    register(node, "x", 50, can_park=False)
    idle(node, "b", idle_s=10.0)
    idle(node, "c", idle_s=0.0, in_flight=1)
    woke = node.heartbeat("a", "i", 0, 50, 0, now=3.0)  # b alone would bring 30 of 50
    assert woke.state == TenantState.PENDING and park_orders(node) == []
    idle(node, "c", idle_s=2.0, now=3.5)  # c is idle now: b and c together cover it
    assert park_orders(node) == ["b", "c"]


def test_a_newcomer_is_admitted_by_parking_idle_tenants_but_refused_when_even_that_fails() -> None:
    node = ledger()
    register(node, "idle", 50)
    register(node, "busy", 50, can_park=False)
    idle(node, "idle", idle_s=5.0)
    assert register(node, "new", 50, now=2.5) == 0  # fits once "idle" parks
    assert park_orders(node) == ["idle"]
    with pytest.raises(AgentError) as refused:  # busy 50 + new 50 (pending): nothing parkable
        register(node, "late", 10, now=2.6)
    assert refused.value.code == "request_does_not_fit"
    assert register(node, "standby", 60, want=0, now=2.7) == 0  # registers parked: admitted
    assert node.tenants["standby"].state() == TenantState.PARKED


def test_on_a_real_gpu_a_waking_tenant_gets_only_what_the_driver_shows_free() -> None:
    node = ledger()
    register(node, "a", 30)
    register(node, "b", 60, can_park=False)
    idle(node, "b", idle_s=0.0)
    node.release("a", "i", held=0, want=0, now=2.0)
    node.driver_free = {"G": 100 - 60 - 30}  # a's process has freed nothing yet
    node.heartbeat("a", "i", 0, 30, 0, now=2.1)  # it wakes at once
    assert node.tenants["a"].granted == 10 and node.tenants["a"].state() == TenantState.PENDING
    assert park_orders(node) == [] and node.free("G") == 30  # nobody parks for what is free
    node.driver_free = {"G": 100 - 60}
    assert node.heartbeat("a", "i", 0, 30, 0, now=2.5).granted_bytes == 30


def test_a_parked_tenant_re_registers_after_an_agent_restart_holding_nothing() -> None:
    node = NodeLedger.start([GpuMemory("G", 0, "sim", 100)], "e2", POLICY, now=0.0, known=["a"])
    assert register(node, "a", 60, want=0) == 0
    assert node.tenants["a"].state() == TenantState.PARKED
    assert not node.recovering(1.0)  # everyone the previous agent knew is back
    assert [type(n) for n in node.drain()] == [Parked]


def test_a_parked_tenant_is_admitted_during_the_restart_grace_and_granted_nothing() -> None:
    node = NodeLedger.start([GpuMemory("G", 0, "sim", 100)], "e3", POLICY, now=0.0)  # blind
    assert register(node, "a", 60, want=0) == 0
    with pytest.raises(AgentError) as refused:
        register(node, "b", 30)  # an empty registration that wants memory waits out the grace
    assert refused.value.code == "recovering"
    assert node.heartbeat("a", "i", 0, 60, 0, now=2.0).granted_bytes == 0  # woke: not yet
    node.tick(now=POLICY.grace_s)
    assert node.tenants["a"].granted == 60


def test_a_waking_tenant_never_stops_a_tenant_that_holds_memory_from_re_registering() -> None:
    """After an agent restart, a parked tenant back first wakes (its request and the others'
    overcommit the GPU); one that holds memory then re-registers: it must be admitted with what
    it holds, or its memory would be granted to the waking one."""
    node = NodeLedger.start([GpuMemory("G", 0, "sim", 100)], "e4", POLICY, now=0.0,
                            known=["a", "b"])  # fmt: skip
    register(node, "a", 60, want=0)
    node.heartbeat("a", "i", 0, 60, 0, now=1.5)  # wakes during the grace
    body = Register(tenant="b", instance="i", gpu_uuid="G", request_bytes=50, limit_bytes=50,
                    held_bytes=50, can_park=True, pid=None)  # fmt: skip
    assert node.register(body, now=2.0).granted_bytes == 50
    node.tick(now=3.0)
    assert node.tenants["a"].granted == 50 and node.tenants["a"].owed == 10


def test_after_a_restart_a_tenant_holding_memory_is_taken_back_even_if_a_waking_one_came_first() -> (
    None
):
    """Found by the state machine: "a" parked, "x" took the whole GPU, "a" woke and waits; the
    agent restarts (state file naming both) and "a" re-registers first, empty and wanting its
    request. "x" still holds 100: it must be taken back, and "a" waits as before."""
    node = ledger()
    register(node, "a", 10)
    node.release("a", "i", held=0, want=0, now=1.5)
    register(node, "x", 100, can_park=False)
    node.heartbeat("x", "i", 100, 100, 1, now=2.0)
    node.heartbeat("a", "i", 0, 10, 0, now=2.5)  # wakes: pending, nothing is free
    known = node.leased(3.0)
    restarted = NodeLedger.start([GpuMemory("G", 0, "sim", 100)], "e2", POLICY, 3.0, known)
    body = Register(tenant="a", instance="i", gpu_uuid="G", request_bytes=10, limit_bytes=10,
                    held_bytes=0, want_bytes=10, can_park=True, pid=None)  # fmt: skip
    assert restarted.register(body, 3.1).granted_bytes == 0
    back = Register(tenant="x", instance="i", gpu_uuid="G", request_bytes=100, limit_bytes=100,
                    held_bytes=100, want_bytes=100, can_park=False, pid=None)  # fmt: skip
    assert restarted.register(back, 3.2).granted_bytes == 100
    assert restarted.tenants["a"].granted == 0 and restarted.free("G") == 0
    with pytest.raises(AgentError) as refused:  # a newcomer still cannot squeeze in
        register(restarted, "late", 10, can_park=False, now=3.3)
    assert refused.value.code == "request_does_not_fit"
