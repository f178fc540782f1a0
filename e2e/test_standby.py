"""Warm standby on the real node (ARCHITECTURE section 5): an idle runtime parks, the node agent
and the service's status show it, and the next request through the Service wakes it and succeeds.
"""

from pathlib import Path
from typing import Any

import pytest

from berth import wire
from berth.cluster.cluster import LocalCluster
from berth.cluster.realnode import AGENT_SOCKET
from berth.e2e.operator_fixtures import OperatorProcess, apply_docs, get_json, wait_for
from berth.e2e.real_node import cluster_ip, post, ready_pod, real_service, routed_post, tenants
from berth.runtime.server.agent_client import AgentClient

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("needs_real_node")]


def tenant_view(name: str) -> Any:
    """The node agent's view of one tenant (``namespace/pod``), or None."""
    for gpu in AgentClient(str(AGENT_SOCKET)).ledger().gpus:
        for tenant in gpu.tenants:
            if tenant.tenant == name:
                return tenant
    return None


def test_an_idle_service_parks_and_the_next_request_wakes_it(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str, tiny_model: Path
) -> None:
    wait_for(
        "earlier tests' pods to leave the real node", lambda: not tenants(cluster), timeout=120
    )
    service = real_service("sleepy", namespace, tiny_model, standby={"idleSeconds": 3})
    apply_docs(cluster, [service])
    pod = wait_for("the runtime pod Ready", lambda: ready_pod(cluster, namespace), timeout=240)
    tenant = f"{namespace}/{pod['metadata']['name']}"
    ip = cluster_ip(cluster, "sleepy", namespace)
    url = f"http://{ip}:8000/v1/completions"
    body = {"model": "sleepy", "prompt": "Hello", "max_tokens": 6, "temperature": 0}
    first = routed_post(url, body)

    # Idle past its timeout: the runtime gives its memory back and the agent marks the pod.
    def parked() -> Any:
        view = tenant_view(tenant)
        return view if view is not None and view.state == "parked" else None

    view = wait_for("the runtime to park after its idle timeout", parked, timeout=60)
    assert view.held_bytes == 0 and view.granted_bytes == 0, view
    status = wait_for(
        "status.standbyReplicas to count it",
        lambda: (
            (s := get_json(cluster, "bis", "sleepy", "-n", namespace).get("status") or {})
            and s.get("standbyReplicas") == 1
            and s
        ),
        timeout=30,
    )
    assert status["readyReplicas"] == 1, "a parked replica still takes requests (it wakes)"
    live = get_json(cluster, "pod", pod["metadata"]["name"], "-n", namespace)
    assert live["metadata"]["annotations"][wire.POD_STANDBY] == "true"

    # The next request wakes it through the Service, and greedy output is what it was.
    again = post(url, body, timeout=120)
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    resident = wait_for(
        "the woken runtime to hold its memory again",
        lambda: (v := tenant_view(tenant)) is not None and v.held_bytes > 0 and v,
        timeout=10,
        every=0.2,
    )
    assert resident.state == "active", resident
    wait_for(
        "status.standbyReplicas back to 0",
        lambda: (
            (get_json(cluster, "bis", "sleepy", "-n", namespace).get("status") or {}).get(
                "standbyReplicas"
            )
            == 0
        ),
        timeout=30,
    )


def test_a_node_whose_memory_cannot_hold_the_standby_copies_is_refused_with_the_numbers(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str, tiny_model: Path
) -> None:
    """Standby copies live in host memory: Berth's scheduler (which binds without kube-scheduler)
    counts each pod's memory request against the node's allocatable memory."""
    service = real_service("hoarder", namespace, tiny_model,
                           standby={"idleSeconds": 60, "hostMemory": "4Ti"})  # fmt: skip
    apply_docs(cluster, [service])

    def unschedulable() -> dict[str, Any] | None:
        status = get_json(cluster, "bis", "hoarder", "-n", namespace).get("status") or {}
        found: dict[str, Any] = next(
            (c for c in status.get("conditions", []) if c["type"] == "Scheduled"), {}
        )
        return found if found.get("reason") == "NoGpuFits" else None

    scheduled = wait_for("the Scheduled condition to refuse it", unschedulable, timeout=60)
    assert "Insufficient memory on" in scheduled["message"], scheduled
    assert "(needs 4096.0 GiB" in scheduled["message"], scheduled
