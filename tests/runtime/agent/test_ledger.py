"""Named scenarios of the ledger's rules (the state machine beside this file checks them at
random; these show each rule once, readably)."""

import subprocess
import sys

import pytest

from berth.agent_protocol import Register, TenantState
from berth.runtime.agent.ledger import (
    AgentError,
    GpuMemory,
    LeasePolicy,
    NodeLedger,
    OverGrant,
    ReclaimIssued,
    ReclaimOverdue,
)

POLICY = LeasePolicy(heartbeat_interval_s=1.0, lease_s=10.0, reclaim_deadline_s=2.0, grace_s=10.0)


def ledger(capacity: int = 100) -> NodeLedger:
    node = NodeLedger.start([GpuMemory("G", 0, "sim", capacity)], "e1", POLICY, now=0.0)
    node.recovering_until = 0.0  # past its start-up grace
    return node


def register(node: NodeLedger, name: str, request: int, limit: int, want: int | None = None,
             held: int = 0, now: float = 1.0) -> int:  # fmt: skip
    body = Register(tenant=name, instance="i", gpu_uuid="G", request_bytes=request,
                    limit_bytes=limit, want_bytes=want, held_bytes=held)  # fmt: skip
    return node.register(body, now).granted_bytes


def test_reclaims_take_from_the_largest_burst_first_and_never_below_a_request() -> None:
    node = ledger()
    register(node, "small", 10, 30, want=30)  # bursts by 20
    register(node, "large", 10, 70, want=70)  # bursts by 60, up to what is free: 70
    assert node.tenants["large"].granted == 70
    node.drain()
    assert register(node, "new", 30, 30) == 0  # nothing free
    issued = [n for n in node.drain() if isinstance(n, ReclaimIssued)]
    assert [(n.tenant, n.target) for n in issued] == [("large", 40)]
    assert node.tenants["small"].reclaim is None


def test_a_tenant_that_lent_its_unused_request_gets_it_back_by_reclaim() -> None:
    node = ledger()
    register(node, "owner", 60, 60)
    node.release("owner", "i", held=20, want=20, now=2.0)  # idle: holds 20 of its 60
    register(node, "burster", 20, 80, want=80)
    assert node.tenants["burster"].granted == 80  # borrowed 40 of the owner's request
    lease = node.heartbeat("owner", "i", held=20, want=60, in_flight=4, now=3.0)  # load is back
    assert lease.state == TenantState.PENDING and lease.granted_bytes == 20
    asked = node.lease(node.tenants["burster"], 3.0)
    assert asked.reclaim is not None and asked.reclaim.target_bytes == 40
    node.release("burster", "i", held=40, want=None, now=3.5)
    assert node.tenants["owner"].granted == 60  # its whole request again
    assert node.tenants["burster"].granted == 40


def test_an_overdue_tenant_keeps_getting_nothing_even_after_the_need_passes() -> None:
    node = ledger()
    register(node, "greedy", 10, 100, want=100)
    register(node, "new", 30, 30)
    node.tick(now=1.0 + POLICY.reclaim_deadline_s + 0.1)
    assert any(isinstance(n, ReclaimOverdue) for n in node.drain())
    node.deregister("new", "i", now=4.0)  # nobody needs the memory any more
    lease = node.heartbeat("greedy", "i", held=100, want=100, in_flight=0, now=4.5)
    assert lease.state == TenantState.OVERDUE and lease.reclaim is not None
    assert lease.reclaim.target_bytes == 70
    partly = node.release("greedy", "i", held=80, want=None, now=5.0)
    assert partly.state == TenantState.OVERDUE and partly.granted_bytes == 80
    lease = node.heartbeat("greedy", "i", held=80, want=100, in_flight=0, now=5.5)
    assert lease.granted_bytes == 80 and node.free("G") == 20  # free, yet not for it
    complied = node.release("greedy", "i", held=70, want=None, now=6.0)
    assert complied.state == TenantState.ACTIVE and complied.granted_bytes == 100


def test_a_tenant_holding_more_than_granted_is_reported_and_refused() -> None:
    node = ledger()
    register(node, "a", 10, 50)
    lease = node.heartbeat("a", "i", held=30, want=50, in_flight=0, now=2.0)
    assert lease.state == TenantState.OVERDUE and lease.granted_bytes == 10
    assert [type(n) for n in node.drain()] == [OverGrant]
    assert node.free("G") == 70  # what it really holds is not handed out


def test_the_restart_grace_grants_only_what_is_held_and_refuses_empty_newcomers() -> None:
    node = NodeLedger.start([GpuMemory("G", 0, "sim", 100)], "e2", POLICY, now=0.0)
    assert register(node, "back", 10, 80, want=80, held=50, now=1.0) == 50
    with pytest.raises(AgentError) as refused:
        register(node, "fresh", 10, 10, now=1.0)
    assert refused.value.code == "recovering" and refused.value.detail["retry_after_s"] == 9.0
    node.tick(now=POLICY.grace_s)
    assert node.tenants["back"].granted == 80


def test_a_registration_holding_more_than_is_free_is_refused_with_what_is_free() -> None:
    node = ledger()
    register(node, "a", 60, 90, want=90)
    with pytest.raises(AgentError) as refused:
        register(node, "late", 20, 40, held=30)
    assert refused.value.code == "held_exceeds_free" and refused.value.detail["free_bytes"] == 10


def test_the_agent_never_imports_torch_or_the_engine() -> None:
    code = (
        "import sys, berth.runtime.agent.cli, berth.runtime.agent.server, "
        "berth.runtime.agent.node, berth.runtime.agent.gpus;"
        "bad = [m for m in ('torch', 'triton', 'berth.runtime.engine') if m in sys.modules];"
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
