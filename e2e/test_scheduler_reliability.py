"""The GPU scheduler against the real control plane (issue 19, items 1-4): a malformed pod does
not stop scheduling, the operator reports its health and metrics, a GPU that Berth holds is
invisible to kube-scheduler and counted by a ResourceQuota, and a pod made by hand with Berth's
annotations gets no share."""

import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from berth import wire
from berth.cluster.cluster import LocalCluster
from berth.cluster.nodes import node_manifest
from berth.e2e.operator_fixtures import (
    CHART_NAMESPACE,
    OperatorProcess,
    apply_docs,
    berth_pods,
    condition,
    get_json,
    namespace,
    operator,
    service_manifest,
    wait_for,
)
from berth.operator.inventory import NodeGroup
from berth.operator.reservations import LABEL_RESERVATION

pytestmark = pytest.mark.e2e
__all__ = ["namespace", "operator"]  # fixtures

NODE = "e2e-reserve"


def http_get(process: OperatorProcess, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{process.health_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except urllib.error.URLError as error:  # not listening yet
        return 0, str(error)


def metric(text: str, name: str) -> float:
    """The sum of every sample of ``name`` (all label sets)."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


@pytest.fixture
def gpu_node(cluster: LocalCluster) -> Iterator[dict[str, Any]]:
    """One kwok node with 8 GPUs, tainted and labelled so only this module's pods land there."""
    group = NodeGroup.model_validate(
        {"name": NODE, "gpus": 8, "gpuProduct": "NVIDIA-H100-80GB-HBM3", "gpuMemoryMiB": 81559,
         "labels": {"pool": NODE}, "taints": [{"key": "pool", "value": NODE, "effect": "NoSchedule"}]}
    )  # fmt: skip
    apply_docs(cluster, [node_manifest(group, NODE)])
    wait_for(
        f"{NODE} Ready",
        lambda: condition(get_json(cluster, "node", NODE), "Ready").get("status") == "True",
    )
    yield {
        "nodeSelector": {"pool": NODE},
        "tolerations": [
            {"key": "pool", "operator": "Equal", "value": NODE, "effect": "NoSchedule"}
        ],
    }
    cluster.kubectl("delete", "node", NODE, "--wait=false", check=False)


def hand_made_pod(
    name: str, namespace: str, annotations: dict[str, str], **spec: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations,
                     "labels": {wire.LABEL_SERVICE: name}},
        "spec": {"schedulerName": wire.SCHEDULER_NAME,
                 "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}], **spec},
    }  # fmt: skip


def events_on(cluster: LocalCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    return list(
        get_json(
            cluster, "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}"
        )["items"]
    )


def test_the_operator_serves_liveness_readiness_and_its_metrics(
    cluster: LocalCluster, operator: OperatorProcess
) -> None:
    wait_for("/readyz 200", lambda: http_get(operator, "/readyz")[0] == 200, timeout=60)
    assert http_get(operator, "/healthz") == (200, "ok\n")
    status, text = http_get(operator, "/metrics")
    assert status == 200
    for name in ("berth_scheduler_binds_total", "berth_scheduler_pending_pods",
                 "berth_scheduler_bind_failures_total", "berth_loop_restarts_total",
                 "berth_handler_errors_total", "berth_gpu_reservations"):  # fmt: skip
        assert f"# TYPE {name.removesuffix('_total')}" in text, name


def test_a_malformed_pod_annotation_is_reported_and_later_pods_still_bind(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str, gpu_node: dict[str, Any]
) -> None:
    before = metric(http_get(operator, "/metrics")[1], "berth_handler_errors_total")
    bad = hand_made_pod(
        "bad", namespace,
        {wire.POD_GPU_INDEX: "0", wire.POD_GPU_MEMORY_REQUEST: "20Gi"},
        nodeName=NODE, tolerations=gpu_node["tolerations"],
    )  # fmt: skip
    apply_docs(cluster, [bad])
    warning = wait_for(
        "a warning event on the malformed pod",
        lambda: [e for e in events_on(cluster, namespace, "bad") if e["type"] == "Warning"],
    )
    assert f"{wire.POD_GPU_MEMORY_REQUEST}='20Gi'" in warning[0]["message"]
    assert f"{namespace}/bad" in operator.log_tail(200)  # the log line names it
    apply_docs(cluster, [service_manifest("after", namespace, 0.25, pod=gpu_node)])
    wait_for(
        "the next pod bound",
        lambda: [p for p in berth_pods(cluster, namespace)
                 if p["metadata"]["name"].startswith("after-") and p["spec"].get("nodeName")],
    )  # fmt: skip
    _, text = http_get(operator, "/metrics")
    assert metric(text, "berth_handler_errors_total") > before
    assert http_get(operator, "/healthz")[0] == 200 and operator.alive()


def test_a_pod_made_by_hand_with_berth_annotations_gets_no_share(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str, gpu_node: dict[str, Any]
) -> None:
    forged = hand_made_pod("forged", namespace, {wire.POD_WANTS_GPU_FRACTION: "0.5"}, **gpu_node)
    apply_docs(cluster, [forged])

    def refused() -> dict[str, Any] | None:
        scheduled = condition(get_json(cluster, "pod", "forged", "-n", namespace), "PodScheduled")
        return scheduled if "not rendered by Berth" in scheduled.get("message", "") else None

    scheduled = wait_for("forged refused", refused, timeout=60)
    assert scheduled["status"] == "False"
    assert not get_json(cluster, "pod", "forged", "-n", namespace)["spec"].get("nodeName")


def test_a_gpu_berth_holds_is_taken_from_kube_scheduler_and_counted_by_a_quota(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str, gpu_node: dict[str, Any]
) -> None:
    quota = {
        "apiVersion": "v1", "kind": "ResourceQuota",
        "metadata": {"name": "gpus", "namespace": CHART_NAMESPACE},
        "spec": {"hard": {f"requests.{wire.GPU_RESOURCE}": "64"}},
    }  # fmt: skip
    apply_docs(cluster, [quota])

    def quota_used() -> dict[str, Any]:
        used = get_json(cluster, "resourcequota", "gpus", "-n", CHART_NAMESPACE).get("status", {})
        return dict(used.get("used") or {})

    # The quota controller must have made its first count before the reservation is created:
    # a pod admitted while the quota is new is otherwise counted only at the next full resync.
    wait_for("the quota's first count", lambda: f"requests.{wire.GPU_RESOURCE}" in quota_used())
    apply_docs(cluster, [service_manifest("tenant", namespace, 0.5, pod=gpu_node)])
    wait_for(
        "the tenant bound",
        lambda: (p := berth_pods(cluster, namespace)) and p[0]["spec"].get("nodeName") == NODE,
    )

    def reservations() -> list[dict[str, Any]]:
        pods = get_json(cluster, "pods", "-n", CHART_NAMESPACE, "-l", LABEL_RESERVATION)["items"]
        return [p for p in pods if p["spec"].get("nodeName") == NODE]

    (reservation,) = wait_for("one reservation pod on the node", reservations)
    container = reservation["spec"]["containers"][0]
    assert container["resources"]["limits"][wire.GPU_RESOURCE] == "1"
    assert container["image"] == "registry.k8s.io/pause:3.10"
    wait_for(
        "the quota to count the reservation",
        lambda: quota_used().get(f"requests.{wire.GPU_RESOURCE}") == "1",
        timeout=30,
    )

    # A default-scheduler pod wanting all 8 GPUs of the node: 7 are free, so it must wait.
    whole = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "whole-node", "namespace": namespace},
        "spec": {**gpu_node, "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10",
                 "resources": {"limits": {wire.GPU_RESOURCE: "8"}}}]},
    }  # fmt: skip
    apply_docs(cluster, [whole])

    def unschedulable() -> dict[str, Any] | None:
        c = condition(get_json(cluster, "pod", "whole-node", "-n", namespace), "PodScheduled")
        return c if c.get("reason") == "Unschedulable" else None

    scheduled = wait_for("kube-scheduler to refuse the 8-GPU pod", unschedulable, timeout=60)
    assert wire.GPU_RESOURCE in scheduled["message"], scheduled
    time.sleep(2)
    assert not get_json(cluster, "pod", "whole-node", "-n", namespace)["spec"].get("nodeName")

    # The tenant leaves: its reservation goes, and the GPUs are the default scheduler's again.
    cluster.kubectl("delete", "inferenceservice", "tenant", "-n", namespace)
    wait_for("the reservation deleted", lambda: not reservations(), timeout=90)
    wait_for(
        "the 8-GPU pod bound once Berth let go",
        lambda: get_json(cluster, "pod", "whole-node", "-n", namespace)["spec"].get("nodeName"),
        timeout=120,
    )
    cluster.kubectl("delete", "resourcequota", "gpus", "-n", CHART_NAMESPACE, check=False)
