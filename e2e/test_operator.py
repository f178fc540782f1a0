"""The operator against the real control plane: admission, packing, restart, no-fit, rollouts."""

import math
from typing import Any

import pytest

from berth import wire
from berth.cluster.cluster import ClusterError, LocalCluster
from berth.cluster.nodes import node_manifest
from berth.e2e.operator_fixtures import (
    OperatorProcess,
    apply_docs,
    berth_pods,
    condition,
    get_json,
    gpu_capacity,
    gpu_usage,
    namespace,
    operator,
    service_manifest,
    wait_for,
)
from berth.operator.inventory import NodeGroup

pytestmark = pytest.mark.e2e
__all__ = ["namespace", "operator"]  # fixtures

# 12 services, 16 pods, 8.0 GPUs of requests: lower bound 8 GPUs on the 4 x 8 cluster.
WORKLOAD = [
    (1.0, 1), (0.75, 1), (0.5, 2), (0.5, 1), (0.375, 2), (0.25, 1),
    (0.25, 2), (0.125, 1), (0.625, 1), (0.125, 2), (0.25, 1), (0.875, 1),
]  # fmt: skip


def running(pods: list[dict[str, Any]]) -> bool:
    return all(p["status"].get("phase") == "Running" and p["spec"].get("nodeName") for p in pods)


def check_no_gpu_over_capacity(
    cluster: LocalCluster,
) -> dict[tuple[str, int], list[tuple[str, int]]]:
    usage = gpu_usage(cluster)
    capacity = gpu_capacity(cluster)
    for (node, index), tenants in usage.items():
        assert sum(r for _, r in tenants) <= capacity[node], (
            f"{node} GPU {index} over capacity: {tenants}"
        )
    return usage


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"gpu": {"fraction": 0}}, "spec.gpu.fraction"),
        ({"gpu": {"fraction": 1.5}}, "spec.gpu.fraction"),
        ({"gpu": {"memory": {"request": "40Gi", "limit": "20Gi"}}}, "spec.gpu.memory.request"),
        ({"replicas": -1}, "spec.replicas"),
        ({"gpuCount": 2}, 'unknown field "spec.gpuCount"'),
        (
            {"gpu": {"fraction": 0.5, "memory": {"request": "1Gi"}}},
            "exactly one of fraction or memory",
        ),
    ],
)
def test_api_server_rejects_invalid_manifests_naming_the_field(
    cluster: LocalCluster, operator: OperatorProcess, spec: dict[str, Any], message: str
) -> None:
    manifest = service_manifest("bad", "default", 0.5)
    manifest["spec"].update(spec)
    with pytest.raises(ClusterError, match=message.replace(".", r"\.")):
        apply_docs(cluster, [manifest])


def test_twelve_services_pack_near_the_lower_bound_and_survive_an_operator_kill(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str
) -> None:
    docs = [service_manifest(f"m{i:02d}", namespace, f, r) for i, (f, r) in enumerate(WORKLOAD)]
    apply_docs(cluster, docs[:6])
    # Kill the operator once some, but not all, of the first pods are bound.
    wait_for(
        "a first pod bound",
        lambda: any(p["spec"].get("nodeName") for p in berth_pods(cluster, namespace)),
        every=0.3,
    )
    operator.kill()
    apply_docs(cluster, docs[6:])  # arrives while no operator runs
    operator.start()

    total = sum(r for _, r in WORKLOAD)
    pods = wait_for(
        f"{total} pods Running",
        lambda: (p := berth_pods(cluster, namespace)) and len(p) == total and running(p) and p,
        timeout=180,
    )
    usage = check_no_gpu_over_capacity(cluster)
    mine = {p["metadata"]["name"] for p in pods}
    gpus_used = {gpu for gpu, tenants in usage.items() if any(name in mine for name, _ in tenants)}
    bound = math.ceil(sum(f * r for f, r in WORKLOAD))
    assert len(gpus_used) <= bound + 1, f"{len(gpus_used)} GPUs for a lower bound of {bound}"
    for gpu, tenants in usage.items():  # replicas of one service never share a GPU
        services = [name.rsplit("-", 2)[0] for name, _ in tenants if name in mine]
        assert len(services) == len(set(services)), f"{gpu}: {tenants}"

    def all_ready() -> list[dict[str, Any]] | None:
        items = get_json(cluster, "inferenceservices", "-n", namespace)["items"]
        ok = len(items) == len(WORKLOAD) and all(
            condition(s, "Ready").get("status") == "True"
            and condition(s, "Scheduled").get("status") == "True"
            for s in items
        )
        return items if ok else None

    services = wait_for("every service Ready and Scheduled", all_ready, timeout=60)
    for service in services:
        assert service["status"]["observedGeneration"] == service["metadata"]["generation"]
        assert service["status"]["url"].startswith(
            f"http://{service['metadata']['name']}.{namespace}.svc"
        )
    deployment = get_json(cluster, "deployment", "m02", "-n", namespace)
    assert deployment["spec"]["template"]["spec"]["schedulerName"] == wire.SCHEDULER_NAME
    assert deployment["metadata"]["ownerReferences"][0]["kind"] == "InferenceService"
    get_json(cluster, "pdb", "m02", "-n", namespace)  # 2 replicas: a disruption budget
    assert "m00" not in cluster.kubectl("get", "pdb", "-n", namespace, "-o", "name")

    # A restart with nothing to do changes nothing: no new pods, no new Deployment generations.
    before = {(p["metadata"]["name"], p["metadata"]["uid"]) for p in pods}
    generations = {
        d["metadata"]["name"]: d["metadata"]["generation"]
        for d in get_json(cluster, "deployments", "-n", namespace)["items"]
    }
    operator.stop()
    operator.start()
    wait_for(
        "the restarted operator to resume every service",
        lambda: operator.log_tail(400).count("Handler 'reconcile' succeeded") >= len(WORKLOAD),
        timeout=60,
    )
    assert {
        (p["metadata"]["name"], p["metadata"]["uid"]) for p in berth_pods(cluster, namespace)
    } == before
    after = {
        d["metadata"]["name"]: d["metadata"]["generation"]
        for d in get_json(cluster, "deployments", "-n", namespace)["items"]
    }
    assert after == generations


@pytest.fixture
def small_pool(cluster: LocalCluster) -> Any:
    """One extra kwok node with a single GPU, tainted so that only the test's pods land there."""
    group = NodeGroup.model_validate(
        {"name": "e2e-small", "gpus": 1, "gpuProduct": "NVIDIA-L4", "gpuMemoryMiB": 23034,
         "labels": {"pool": "small"}, "taints": [{"key": "pool", "value": "small", "effect": "NoSchedule"}]}
    )  # fmt: skip
    apply_docs(cluster, [node_manifest(group, "e2e-small")])
    wait_for(
        "the small node Ready",
        lambda: condition(get_json(cluster, "node", "e2e-small"), "Ready").get("status") == "True",
    )
    yield {
        "nodeSelector": {"pool": "small"},
        "tolerations": [
            {"key": "pool", "operator": "Equal", "value": "small", "effect": "NoSchedule"}
        ],
    }
    cluster.kubectl("delete", "node", "e2e-small", "--wait=false", check=False)


def test_no_fit_stays_pending_with_a_condition_until_a_deletion_frees_room(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str, small_pool: dict[str, Any]
) -> None:
    big = service_manifest("big", namespace, 0.75, pod=small_pool)
    apply_docs(cluster, [big])
    wait_for("big Running", lambda: running(p := berth_pods(cluster, namespace)) and len(p) == 1)
    late = service_manifest("late", namespace, 0.5, pod=small_pool)
    apply_docs(cluster, [late])

    def not_scheduled() -> dict[str, Any] | None:
        scheduled = condition(
            get_json(cluster, "inferenceservice", "late", "-n", namespace), "Scheduled"
        )
        return scheduled if scheduled.get("reason") == "NoGpuFits" else None

    scheduled = wait_for("late's Scheduled=False/NoGpuFits", not_scheduled)
    assert scheduled["status"] == "False" and "GPUs fit" in scheduled["message"]
    (pod,) = [
        p for p in berth_pods(cluster, namespace) if p["metadata"]["name"].startswith("late-")
    ]
    assert not pod["spec"].get("nodeName")
    events = cluster.kubectl(
        "get",
        "events",
        "-n",
        namespace,
        "--field-selector",
        "reason=FailedScheduling",
        "-o",
        "name",
    )
    assert events.strip(), "no FailedScheduling event"

    cluster.kubectl("delete", "inferenceservice", "big", "-n", namespace)
    wait_for(
        "the garbage collector to remove big's Deployment",
        lambda: "big" not in cluster.kubectl("get", "deployments", "-n", namespace, "-o", "name"),
    )
    wait_for(
        "late Running on the freed GPU",
        lambda: (
            (p := berth_pods(cluster, namespace))
            and len(p) == 1
            and running(p)
            and p[0]["spec"]["nodeName"] == "e2e-small"
        ),
        timeout=60,
    )
    check_no_gpu_over_capacity(cluster)


def test_spec_updates_roll_and_unservable_specs_become_conditions(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str
) -> None:
    apply_docs(cluster, [service_manifest("roll", namespace, 0.25, maxReplicas=3)])
    (first,) = wait_for(
        "roll Running", lambda: running(p := berth_pods(cluster, namespace)) and len(p) == 1 and p
    )
    cluster.kubectl(
        "patch",
        "inferenceservice",
        "roll",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"runtime": {"maxModelLen": 4096}}}',
    )

    def rolled() -> list[dict[str, Any]] | None:
        pods = berth_pods(cluster, namespace)
        fresh = [p for p in pods if p["metadata"]["uid"] != first["metadata"]["uid"]]
        return fresh if len(pods) == 1 and fresh and running(fresh) else None

    (second,) = wait_for("the rollout to replace the pod", rolled, timeout=90)
    assert "4096" in second["spec"]["containers"][0]["args"]
    service = get_json(cluster, "inferenceservice", "roll", "-n", namespace)
    wait_for(
        "observedGeneration 2",
        lambda: (
            get_json(cluster, "inferenceservice", "roll", "-n", namespace)["status"].get(
                "observedGeneration"
            )
            == service["metadata"]["generation"]
        ),
    )

    # The scale subresource: two replicas get a disruption budget, one replica loses it again.
    cluster.kubectl("scale", "inferenceservice", "roll", "-n", namespace, "--replicas=2")
    wait_for(
        "two replicas Running", lambda: running(p := berth_pods(cluster, namespace)) and len(p) == 2
    )
    wait_for(
        "a PodDisruptionBudget",
        lambda: "roll" in cluster.kubectl("get", "pdb", "-n", namespace, "-o", "name"),
    )
    cluster.kubectl("scale", "inferenceservice", "roll", "-n", namespace, "--replicas=1")
    wait_for(
        "the budget pruned",
        lambda: "roll" not in cluster.kubectl("get", "pdb", "-n", namespace, "-o", "name"),
    )

    # Admitted, yet its Deployment is refused (an env var from a field pods do not have; the CRD
    # keeps valueFrom as a free-form EnvVarSource): a condition, no crash.
    broken = service_manifest(
        "broken",
        namespace,
        0.25,
        pod={"env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "metadata.bogus"}}}]},
    )
    apply_docs(cluster, [broken])

    def invalid() -> dict[str, Any] | None:
        ready = condition(get_json(cluster, "inferenceservice", "broken", "-n", namespace), "Ready")
        return ready if ready.get("reason") == "InvalidSpec" else None

    ready = wait_for("broken's Ready=False/InvalidSpec", invalid)
    assert "metadata.bogus" in ready["message"]
    assert operator.alive()
