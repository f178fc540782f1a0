"""The node agent's Kubernetes adapter against the real API server: it publishes the node's GPUs
as the annotations the scheduler reads, reports a tenant that ignores a reclaim with a Warning
event on the tenant's pod, and marks a parked tenant's pod standby (what the operator counts)."""

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from berth import wire
from berth.cluster.cluster import LocalCluster
from berth.e2e.agent_process import AgentProcess, running_agent, wait_until_granting
from berth.operator.gpus import node_from_object

pytestmark = pytest.mark.e2e
GIB = 2**30
NODE = "agent-node"
NAMESPACE = "agent-e2e"


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def agent(
    cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AgentProcess]:
    """An agent for a Node of its own (not a kwok node: the other tests own those)."""
    node = {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE, "labels": {wire.NODE_GPU_MEMORY_MIB: "81920"}},
            "status": {"capacity": {wire.GPU_RESOURCE: "2"}}}  # fmt: skip
    cluster.kubectl("apply", "-f", "-", input=json.dumps(node))
    cluster.kubectl("create", "namespace", NAMESPACE)
    flags = ("--simulate-gpus", "GPU-e2e-0:80Gi,GPU-e2e-1:80Gi", "--reserve", "1Gi",
             "--node-name", NODE, "--kubeconfig", str(cluster.kubeconfig),
             "--lease", "3", "--heartbeat-interval", "0.5", "--reclaim-deadline", "0.5")  # fmt: skip
    try:
        with running_agent(Path(tmp_path_factory.mktemp("agent")), *flags) as process:
            yield process
    finally:
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
        cluster.kubectl("delete", "node", NODE, "--wait=false", check=False)


def test_the_agent_publishes_each_gpus_uuid_and_shareable_memory_on_its_node(
    cluster: LocalCluster, agent: AgentProcess
) -> None:
    def annotations() -> dict[str, str] | None:
        node = json.loads(cluster.kubectl("get", "node", NODE, "-o", "json"))
        found: dict[str, str] = node["metadata"].get("annotations") or {}
        return found if wire.NODE_GPU_UUIDS in found else None

    published = wait_for(annotations, 30, "the node's GPU annotations")
    assert published[wire.NODE_GPU_UUIDS] == "GPU-e2e-0,GPU-e2e-1"
    assert published[wire.NODE_GPU_MEMORY_BYTES] == f"{79 * GIB},{79 * GIB}"
    # What the scheduler makes of the Node: its GPUs by UUID.
    node = node_from_object(json.loads(cluster.kubectl("get", "node", NODE, "-o", "json")))
    assert [gpu.uuid for gpu in node.gpus] == ["GPU-e2e-0", "GPU-e2e-1"]


def test_a_tenant_that_ignores_a_reclaim_gets_a_warning_event_on_its_pod(
    cluster: LocalCluster, agent: AgentProcess
) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "greedy", "namespace": NAMESPACE},
           "spec": {"schedulerName": "nobody", "containers": [{"name": "c", "image": "none"}]}}  # fmt: skip
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
    with agent.client() as client:
        wait_until_granting(client)
        greedy = {"tenant": f"{NAMESPACE}/greedy", "instance": "i1", "gpu_uuid": "GPU-e2e-1",
                  "request_bytes": 10 * GIB, "limit_bytes": 79 * GIB, "want_bytes": 79 * GIB}  # fmt: skip
        assert client.post("/v1/tenants", json=greedy).json()["granted_bytes"] == 79 * GIB
        newcomer = {"tenant": f"{NAMESPACE}/newcomer", "instance": "i1", "gpu_uuid": "GPU-e2e-1",
                    "request_bytes": 20 * GIB, "limit_bytes": 20 * GIB}  # fmt: skip
        assert client.post("/v1/tenants", json=newcomer).json()["state"] == "pending"
        beat = {"instance": "i1", "held_bytes": 79 * GIB, "want_bytes": 79 * GIB}
        path = f"/v1/tenants/{NAMESPACE}/greedy/heartbeat"

        def overdue() -> bool:
            return bool(client.post(path, json=beat).json()["state"] == "overdue")

        wait_for(overdue, 10, "the reclaim to go overdue")

    def event() -> dict[str, Any] | None:
        events = json.loads(cluster.kubectl(
            "get", "events", "-n", NAMESPACE, "--field-selector", "involvedObject.name=greedy",
            "-o", "json"))["items"]  # fmt: skip
        return next((e for e in events if e["reason"] == "GpuReclaimOverdue"), None)

    found = wait_for(event, 30, "the GpuReclaimOverdue event")
    assert found["type"] == "Warning"
    assert found["involvedObject"]["kind"] == "Pod"
    assert "shrink to" in found["message"] and "GPU-e2e-1" in found["message"]


def test_a_parked_tenants_pod_is_marked_standby_until_it_is_resident_again(
    cluster: LocalCluster, agent: AgentProcess
) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "standby", "namespace": NAMESPACE},
           "spec": {"schedulerName": "nobody", "containers": [{"name": "c", "image": "none"}]}}  # fmt: skip
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))

    def standby() -> str | None:
        found = json.loads(cluster.kubectl("get", "pod", "standby", "-n", NAMESPACE, "-o", "json"))
        annotations: dict[str, str] = found["metadata"].get("annotations") or {}
        return annotations.get(wire.POD_STANDBY)

    with agent.client() as client:
        wait_until_granting(client)
        body = {"tenant": f"{NAMESPACE}/standby", "instance": "i1", "gpu_uuid": "GPU-e2e-0",
                "request_bytes": 20 * GIB, "limit_bytes": 20 * GIB, "can_park": True}  # fmt: skip
        assert client.post("/v1/tenants", json=body).json()["granted_bytes"] == 20 * GIB
        assert standby() is None  # resident from the start: nothing to mark
        path = f"/v1/tenants/{NAMESPACE}/standby"
        parked = client.post(f"{path}/release",
                             json={"instance": "i1", "held_bytes": 0, "want_bytes": 0})  # fmt: skip
        assert parked.json()["state"] == "parked"
        wait_for(lambda: standby() == "true", 30, "the pod's standby annotation")
        woke = client.post(f"{path}/heartbeat",
                           json={"instance": "i1", "held_bytes": 0, "want_bytes": 20 * GIB})  # fmt: skip
        assert woke.json()["granted_bytes"] == 20 * GIB
        wait_for(lambda: standby() == "false", 30, "the pod marked resident again")
        client.delete(path, params={"instance": "i1"})
