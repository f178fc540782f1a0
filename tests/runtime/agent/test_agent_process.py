"""The real ``berth node-agent`` process, spoken to over its real unix socket.

One agent serves most tests, each on a GPU of its own; the restart and shutdown tests start
their own agents.
"""

import concurrent.futures
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from berth.e2e.agent_process import MIB, AgentProcess, metric, running_agent, wait_until_granting

LEASE_S = 3.0
DEADLINE_S = 1.0
ALLOCATABLE = 96 * MIB  # 100Mi GPUs, 4Mi reserved


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    gpus = ",".join(f"GPU-{i}:100Mi" for i in range(1, 9))
    flags = ["--simulate-gpus", gpus, "--reserve", "4Mi", "--lease", str(LEASE_S),
             "--heartbeat-interval", "0.5", "--reclaim-deadline", str(DEADLINE_S)]  # fmt: skip
    with running_agent(tmp_path_factory.mktemp("agent"), *flags) as process:
        wait_until_granting(process.client())
        yield process


@pytest.fixture
def client(agent: AgentProcess) -> Iterator[httpx.Client]:
    with agent.client() as http:
        yield http


def register_body(tenant: str, gpu: str, request: int, limit: int, **extra: Any) -> dict[str, Any]:
    body = {"tenant": tenant, "instance": "i1", "gpu_uuid": gpu,
            "request_bytes": request * MIB, "limit_bytes": limit * MIB}  # fmt: skip
    return {**body, **extra}


def heartbeat(
    client: httpx.Client, tenant: str, held: int, want: int, instance: str = "i1"
) -> dict[str, Any]:
    body = {"instance": instance, "held_bytes": held * MIB, "want_bytes": want * MIB}
    response = client.post(f"/v1/tenants/{tenant}/heartbeat", json=body)
    assert response.status_code == 200, response.text
    reply: dict[str, Any] = response.json()
    return reply


def release(client: httpx.Client, tenant: str, held: int) -> dict[str, Any]:
    response = client.post(
        f"/v1/tenants/{tenant}/release", json={"instance": "i1", "held_bytes": held * MIB}
    )
    assert response.status_code == 200, response.text
    reply: dict[str, Any] = response.json()
    return reply


def gpu_view(client: httpx.Client, uuid: str) -> dict[str, Any]:
    gpus: list[dict[str, Any]] = client.get("/v1/gpus").json()["gpus"]
    return next(g for g in gpus if g["uuid"] == uuid)


def test_admits_requests_that_fit_and_refuses_the_rest_with_the_numbers(
    client: httpx.Client,
) -> None:
    first = client.post("/v1/tenants", json=register_body("ns/fit-a", "GPU-1", 60, 60))
    assert first.status_code == 200, first.text
    assert first.json()["granted_bytes"] == 60 * MIB
    assert first.json()["lease_s"] == LEASE_S
    refused = client.post("/v1/tenants", json=register_body("ns/fit-b", "GPU-1", 40, 40))
    assert refused.status_code == 409
    error = refused.json()["error"]
    assert error["code"] == "request_does_not_fit" and error["field"] == "request_bytes"
    assert error["detail"] == {"allocatable_bytes": ALLOCATABLE, "requested_bytes": 60 * MIB,
                               "request_bytes": 40 * MIB}  # fmt: skip
    assert (
        client.post("/v1/tenants", json=register_body("local", "GPU-1", 36, 36)).status_code == 200
    )
    assert gpu_view(client, "GPU-1")["requested_bytes"] == ALLOCATABLE


BAD_REGISTRATIONS = [
    ({"limit_bytes": 1 * MIB}, "limit_bytes"),
    ({"held_bytes": 50 * MIB}, "held_bytes"),
    ({"want_bytes": 50 * MIB}, "want_bytes"),
    ({"request_bytes": "1048576"}, "request_bytes"),
    ({"request_bytes": -1}, "request_bytes"),
    ({"priority": 3}, "priority"),
    ({"tenant": "ns//pod"}, "tenant"),
    ({"instance": "has space"}, "instance"),
    ({"gpu_uuid": "GPU-nope"}, "gpu_uuid"),
]


@pytest.mark.parametrize(("change", "field"), BAD_REGISTRATIONS)
def test_a_bad_registration_is_a_400_naming_the_field(
    client: httpx.Client, change: dict[str, Any], field: str
) -> None:
    body = {**register_body("ns/bad", "GPU-2", 10, 20), **change}
    response = client.post("/v1/tenants", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["field"] == field, error
    assert field in error["message"] or error["code"] == "unknown_gpu"


def test_bad_calls_of_a_registered_tenant_are_4xx_naming_the_field(client: httpx.Client) -> None:
    assert client.post("/v1/tenants", json=register_body("ns/calls", "GPU-2", 10, 20)).is_success
    path = "/v1/tenants/ns/calls"
    over = client.post(f"{path}/heartbeat",
                       json={"instance": "i1", "held_bytes": 0, "want_bytes": 21 * MIB})  # fmt: skip
    assert over.status_code == 400 and over.json()["error"]["field"] == "want_bytes"
    missing = client.post(f"{path}/heartbeat", json={"instance": "i1", "held_bytes": 0})
    assert missing.status_code == 400 and missing.json()["error"]["field"] == "want_bytes"
    other = client.post(f"{path}/release", json={"instance": "i2", "held_bytes": 0})
    assert other.status_code == 409 and other.json()["error"]["code"] == "instance_mismatch"
    unknown = client.post("/v1/tenants/ns/nobody/heartbeat",
                          json={"instance": "i1", "held_bytes": 0, "want_bytes": 0})  # fmt: skip
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_tenant"
    no_instance = client.delete(path)
    assert no_instance.status_code == 400 and no_instance.json()["error"]["field"] == "instance"
    broken = client.post(f"{path}/release", content=b"{not json",
                         headers={"content-type": "application/json"})  # fmt: skip
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
    assert client.delete(path, params={"instance": "i1"}).status_code == 204
    assert gpu_view(client, "GPU-2")["tenants"] == []


def test_a_newcomer_gets_its_request_by_reclaiming_a_burst(client: httpx.Client) -> None:
    burst = client.post("/v1/tenants", json=register_body("ns/burst", "GPU-3", 30, 90))
    assert burst.json()["granted_bytes"] == 30 * MIB  # wants its request by default
    assert heartbeat(client, "ns/burst", 30, 90)["granted_bytes"] == 90 * MIB
    heartbeat(client, "ns/burst", 90, 90)
    newcomer = client.post("/v1/tenants", json=register_body("ns/new", "GPU-3", 40, 40)).json()
    assert newcomer["state"] == "pending" and newcomer["granted_bytes"] == 6 * MIB
    asked = heartbeat(client, "ns/burst", 90, 90)
    assert asked["state"] == "reclaiming"
    assert asked["reclaim"]["target_bytes"] == 56 * MIB  # gives back exactly what is owed
    assert 0 < asked["reclaim"]["deadline_s"] <= DEADLINE_S
    assert release(client, "ns/burst", 56)["granted_bytes"] == 56 * MIB
    served = heartbeat(client, "ns/new", 0, 40)
    assert served["state"] == "active" and served["granted_bytes"] == 40 * MIB
    view = gpu_view(client, "GPU-3")
    assert view["granted_bytes"] == ALLOCATABLE and view["free_bytes"] == 0


def test_an_orders_long_poll_answers_when_a_reclaim_is_issued_and_otherwise_times_out(
    agent: AgentProcess, client: httpx.Client
) -> None:
    orders = "/v1/tenants/ns/poller/orders"
    client.post("/v1/tenants", json=register_body("ns/poller", "GPU-8", 30, 90))
    heartbeat(client, "ns/poller", 90, 90)  # bursts to 90
    started = time.monotonic()
    quiet = client.get(orders, params={"instance": "i1", "wait_s": 0.4})
    assert quiet.status_code == 200 and quiet.json()["reclaim"] is None
    assert 0.4 <= time.monotonic() - started < 2.0

    with agent.client() as poller:  # a newcomer is owed what the burst holds: a reclaim
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(poller.get, orders, params={"instance": "i1", "wait_s": 20})
            time.sleep(0.3)
            client.post("/v1/tenants", json=register_body("ns/owed", "GPU-8", 40, 40))
            answered = waiting.result(timeout=10)
    assert answered.status_code == 200, answered.text
    assert answered.json()["reclaim"]["target_bytes"] == 56 * MIB
    assert time.monotonic() - started < 2.0  # not the 20 s wait
    # The orders call is a read: it is no heartbeat (the poller's lease is kept by its own).
    assert heartbeat(client, "ns/poller", 90, 90)["reclaim"]["target_bytes"] == 56 * MIB

    for params, status, field in [({"instance": "i1", "wait_s": 31}, 400, "wait_s"),
                                  ({"instance": "i1", "wait_s": "nan"}, 400, "wait_s"),
                                  ({"instance": "other"}, 409, "instance")]:  # fmt: skip
        bad = client.get(orders, params=params)
        assert bad.status_code == status, bad.text
        assert bad.json()["error"]["field"] == field
    missing = client.get("/v1/tenants/ns/nobody/orders", params={"instance": "i1"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_tenant"


def test_a_tenant_that_ignores_a_reclaim_is_reported_and_gets_nothing_more(
    client: httpx.Client,
) -> None:
    client.post(
        "/v1/tenants", json=register_body("ns/stubborn", "GPU-4", 30, 96, want_bytes=80 * MIB)
    )
    heartbeat(client, "ns/stubborn", 80, 80)
    newcomer = client.post("/v1/tenants", json=register_body("ns/waiting", "GPU-4", 40, 40)).json()
    assert newcomer["granted_bytes"] == 16 * MIB
    assert heartbeat(client, "ns/stubborn", 80, 80)["state"] == "reclaiming"
    time.sleep(DEADLINE_S + 0.6)  # past the deadline, and a tick of the agent
    overdue = heartbeat(client, "ns/stubborn", 80, 96)
    assert overdue["state"] == "overdue" and overdue["reclaim"]["deadline_s"] < 0
    assert overdue["granted_bytes"] == 80 * MIB  # no new grant, though it wants 96
    assert heartbeat(client, "ns/waiting", 0, 40)["granted_bytes"] == 16 * MIB  # still owed
    text = client.get("/metrics").text
    assert metric(text, "berth_gpu_reclaim_overdue_total", gpu="GPU-4", tenant="ns/stubborn") == 1
    assert metric(text, "berth_gpu_tenant_state", gpu="GPU-4", tenant="ns/stubborn",
                  state="overdue") == 1  # fmt: skip
    # The waiting tenant leaves: memory is free, yet the overdue tenant still gets none of it.
    assert client.delete("/v1/tenants/ns/waiting", params={"instance": "i1"}).status_code == 204
    still = heartbeat(client, "ns/stubborn", 80, 96)
    assert still["state"] == "overdue" and still["granted_bytes"] == 80 * MIB
    assert gpu_view(client, "GPU-4")["free_bytes"] == 16 * MIB
    # Once it complies it is a tenant like any other again.
    assert release(client, "ns/stubborn", 56)["state"] == "active"
    assert heartbeat(client, "ns/stubborn", 56, 96)["granted_bytes"] == 96 * MIB


def test_a_tenant_whose_heartbeat_lapses_is_dropped_and_its_memory_returns(
    client: httpx.Client,
) -> None:
    client.post("/v1/tenants", json=register_body("ns/crashed", "GPU-5", 50, 50))
    assert gpu_view(client, "GPU-5")["granted_bytes"] == 50 * MIB
    time.sleep(LEASE_S + 1.0)  # no heartbeat: the pod crashed
    view = gpu_view(client, "GPU-5")
    assert view["tenants"] == [] and view["granted_bytes"] == 0
    assert view["free_bytes"] == ALLOCATABLE
    assert metric(client.get("/metrics").text, "berth_gpu_tenant_lapses_total", gpu="GPU-5") == 1
    late = client.post("/v1/tenants/ns/crashed/heartbeat",
                       json={"instance": "i1", "held_bytes": 0, "want_bytes": 0})  # fmt: skip
    assert late.status_code == 404


def test_metrics_export_the_ledger_per_gpu_and_per_tenant(client: httpx.Client) -> None:
    client.post("/v1/tenants", json=register_body("ns/metered", "GPU-6", 10, 20, pid=4242))
    body = {"instance": "i1", "held_bytes": 8 * MIB, "want_bytes": 10 * MIB, "in_flight": 3}
    client.post("/v1/tenants/ns/metered/heartbeat", json=body)
    text = client.get("/metrics").text
    expected_gpu = {"capacity": 100 * MIB, "reserved": 4 * MIB, "requested": 10 * MIB,
                    "granted": 10 * MIB, "resident": 8 * MIB, "free": 86 * MIB}  # fmt: skip
    for name, value in expected_gpu.items():
        assert metric(text, f"berth_gpu_memory_{name}_bytes", gpu="GPU-6") == value, name
    labels = {"gpu": "GPU-6", "tenant": "ns/metered"}
    assert metric(text, "berth_gpu_tenant_request_bytes", **labels) == 10 * MIB
    assert metric(text, "berth_gpu_tenant_limit_bytes", **labels) == 20 * MIB
    assert metric(text, "berth_gpu_tenant_resident_bytes", **labels) == 8 * MIB
    assert metric(text, "berth_gpu_tenant_in_flight_requests", **labels) == 3
    assert metric(text, "berth_gpu_tenant_state", state="active", **labels) == 1
    assert metric(text, "berth_node_agent_recovering") == 0
    tenant = gpu_view(client, "GPU-6")["tenants"][0]
    assert tenant["pid"] == 4242 and tenant["in_flight"] == 3


def test_a_parked_tenant_wakes_by_parking_the_idle_one_and_metrics_show_it(
    client: httpx.Client,
) -> None:
    """Warm standby over the socket: a tenant parks on its own, a newcomer takes its room, and
    its wake parks the idle tenant (never the busy newcomer)."""
    park = {"can_park": True}
    assert client.post("/v1/tenants", json=register_body("ns/sleepy", "GPU-7", 50, 50, **park))
    assert client.post("/v1/tenants", json=register_body("ns/waker", "GPU-7", 46, 46, **park))
    idle = {"instance": "i1", "held_bytes": 50 * MIB, "want_bytes": 50 * MIB, "idle_s": 30.0}
    assert client.post("/v1/tenants/ns/sleepy/heartbeat", json=idle).json()["reclaim"] is None
    parked = client.post("/v1/tenants/ns/waker/release",
                         json={"instance": "i1", "held_bytes": 0, "want_bytes": 0}).json()  # fmt: skip
    assert parked["state"] == "parked" and parked["granted_bytes"] == 0
    assert gpu_view(client, "GPU-7")["requested_bytes"] == 50 * MIB  # a parked request is not
    other = client.post("/v1/tenants", json=register_body("ns/busy", "GPU-7", 46, 46)).json()
    assert other["granted_bytes"] == 46 * MIB  # fits in the room the parked tenant gave back
    busy = {"instance": "i1", "held_bytes": 46 * MIB, "want_bytes": 46 * MIB, "in_flight": 2}
    client.post("/v1/tenants/ns/busy/heartbeat", json=busy)

    waking = heartbeat(client, "ns/waker", 0, 46)
    assert waking["state"] == "pending" and waking["granted_bytes"] == 0
    asked = client.post("/v1/tenants/ns/sleepy/heartbeat", json=idle).json()
    assert asked["reclaim"]["park"] is True and asked["reclaim"]["target_bytes"] == 0
    assert client.post("/v1/tenants/ns/busy/heartbeat", json=busy).json()["reclaim"] is None
    gone = client.post("/v1/tenants/ns/sleepy/release",
                       json={"instance": "i1", "held_bytes": 0, "want_bytes": 0}).json()  # fmt: skip
    assert gone["state"] == "parked"
    woke = heartbeat(client, "ns/waker", 0, 46)
    assert woke["state"] == "active" and woke["granted_bytes"] == 46 * MIB

    text = client.get("/metrics").text
    labels = {"gpu": "GPU-7", "tenant": "ns/sleepy"}
    assert metric(text, "berth_gpu_tenant_state", state="parked", **labels) == 1
    assert metric(text, "berth_gpu_tenant_idle_seconds", **labels) == 30.0
    assert metric(text, "berth_gpu_park_requests_total", gpu="GPU-7") == 1
    assert metric(text, "berth_gpu_parks_total", gpu="GPU-7", reason="agent") == 1
    assert metric(text, "berth_gpu_parks_total", gpu="GPU-7", reason="tenant") == 1
    view = {t["tenant"]: t for t in gpu_view(client, "GPU-7")["tenants"]}
    assert view["ns/sleepy"]["can_park"] and not view["ns/busy"]["can_park"]
    negative = client.post("/v1/tenants/ns/busy/heartbeat", json={**busy, "idle_s": -1.0})
    assert negative.status_code == 400 and negative.json()["error"]["field"] == "idle_s"


def test_after_a_restart_tenants_get_back_what_they_hold_and_nothing_twice(
    tmp_path: Path,
) -> None:
    flags = ("--simulate-gpus", "GPU-r:100Mi", "--reserve", "4Mi", "--lease", "2",
             "--heartbeat-interval", "0.5", "--grace", "6")  # fmt: skip
    first = AgentProcess(tmp_path / "agent.sock", tmp_path / "agent.log", *flags)
    first.start()
    try:
        with first.client() as client:
            wait_until_granting(client)
            client.post(
                "/v1/tenants", json=register_body("ns/a", "GPU-r", 30, 60, want_bytes=60 * MIB)
            )
            client.post(
                "/v1/tenants", json=register_body("ns/b", "GPU-r", 20, 36, want_bytes=36 * MIB)
            )
            assert gpu_view(client, "GPU-r")["granted_bytes"] == ALLOCATABLE
            old_epoch = client.get("/healthz").json()["agent_epoch"]
    finally:
        first.stop(signal.SIGKILL)  # leaves a stale socket behind
    state = json.loads((tmp_path / "agent-tenants.json").read_text())
    assert state["tenants"] == ["ns/a", "ns/b"]  # written before each registration's reply
    # ns/a had mapped 50 of its 60; ns/b all 36. The new agent knows only their names.
    second = AgentProcess(tmp_path / "agent.sock", tmp_path / "agent.log", *flags)
    second.start()
    try:
        with second.client() as client:
            health = client.get("/healthz").json()
            assert health["agent_epoch"] != old_epoch and health["recovering_s"] > 0
            lost = client.post("/v1/tenants/ns/a/heartbeat",
                               json={"instance": "i1", "held_bytes": 50 * MIB, "want_bytes": 60 * MIB})  # fmt: skip
            assert lost.status_code == 404
            fresh = client.post("/v1/tenants", json=register_body("ns/c", "GPU-r", 10, 10))
            assert fresh.status_code == 503 and fresh.json()["error"]["code"] == "recovering"
            assert int(fresh.headers["retry-after"]) >= 1
            again = client.post("/v1/tenants", json=register_body(
                "ns/a", "GPU-r", 30, 60, held_bytes=50 * MIB, want_bytes=60 * MIB))  # fmt: skip
            assert again.json()["granted_bytes"] == 50 * MIB  # what it holds, not its old 60
            assert heartbeat(client, "ns/a", 50, 60)["granted_bytes"] == 50 * MIB  # still grace
            back = client.post("/v1/tenants", json=register_body(
                "ns/b", "GPU-r", 20, 36, held_bytes=36 * MIB, want_bytes=36 * MIB))  # fmt: skip
            assert back.json()["granted_bytes"] == 36 * MIB
            # The state file named exactly these two: with both back, the grace ends at once.
            assert client.get("/healthz").json()["recovering_s"] == 0
            while client.get("/healthz").json()["recovering_s"] > 0:  # heartbeating meanwhile
                assert heartbeat(client, "ns/a", 50, 60)["granted_bytes"] == 50 * MIB
                assert heartbeat(client, "ns/b", 36, 36)["granted_bytes"] == 36 * MIB
                time.sleep(0.3)
            assert heartbeat(client, "ns/a", 50, 60)["granted_bytes"] == 60 * MIB
            assert gpu_view(client, "GPU-r")["granted_bytes"] == ALLOCATABLE
            assert heartbeat(client, "ns/b", 36, 36)["granted_bytes"] == 36 * MIB
    finally:
        second.stop(signal.SIGKILL)


def test_sigterm_stops_the_agent_and_removes_its_socket_and_a_second_agent_is_refused(
    tmp_path: Path,
) -> None:
    agent = AgentProcess(tmp_path / "agent.sock", tmp_path / "agent.log",
                         "--simulate-gpus", "1x1Gi")  # fmt: skip
    agent.start()
    try:
        rival = subprocess.run(
            [sys.executable, "-m", "berth", "node-agent", "--socket", str(agent.socket),
             "--simulate-gpus", "1x1Gi"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert rival.returncode != 0
        assert "another node agent is already serving" in rival.stderr
        assert agent.client().get("/healthz").status_code == 200
    finally:
        assert agent.stop(signal.SIGTERM) == 0
    assert not agent.socket.exists()


def test_sigterm_answers_a_waiting_orders_poll_and_exits_at_once(tmp_path: Path) -> None:
    """The server drains its connections before it exits: a pending long poll must not hold
    the agent up for its whole wait (the pod's grace period would run out, then SIGKILL)."""
    agent = AgentProcess(tmp_path / "agent.sock", tmp_path / "agent.log",
                         "--simulate-gpus", "GPU-p:100Mi")  # fmt: skip
    agent.start()
    with agent.client() as client:
        wait_until_granting(client)
        assert client.post("/v1/tenants", json=register_body("ns/p", "GPU-p", 10, 10)).is_success
    poll = "/v1/tenants/ns/p/orders"
    with concurrent.futures.ThreadPoolExecutor(1) as pool, agent.client() as poller:
        waiting = pool.submit(poller.get, poll, params={"instance": "i1", "wait_s": 25},
                              timeout=40)  # fmt: skip
        time.sleep(0.5)
        started = time.monotonic()
        assert agent.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 5.0
        answered = waiting.result(timeout=10)
    assert answered.status_code == 200 and answered.json()["reclaim"] is None
