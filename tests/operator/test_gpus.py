"""Reading GPU inventory, demands and allocations out of Node and Pod objects."""

from typing import Any

from berth import wire
from berth.cluster.nodes import node_manifest
from berth.operator import gpus
from berth.operator.inventory import Inventory, NodeGroup
from berth.operator.placement import Allocation, Gpu, Resources

GROUP = NodeGroup.model_validate(
    {"name": "g", "gpus": 2, "gpuProduct": "NVIDIA-L4", "gpuMemoryMiB": 23034,
     "taints": [{"key": "k", "value": "v", "effect": "NoSchedule"}]}
)  # fmt: skip


def ready(node: dict[str, Any]) -> dict[str, Any]:
    node["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    return node


def test_a_kwok_node_reads_as_its_inventory_entry() -> None:
    node = gpus.node_from_object(ready(node_manifest(GROUP, "g")))
    assert node.schedulable and [g.memory for g in node.gpus] == [23034 * 2**20] * 2
    assert (
        node.gpus[0].product == "NVIDIA-L4"
        and node.gpus[1].uuid
        and node.gpus[1].uuid.startswith("GPU-")
    )
    assert node.taints[0].effect == "NoSchedule"
    (from_inventory,) = gpus.nodes_from_inventory(Inventory(nodes=[GROUP]))
    assert from_inventory.gpus == tuple(
        Gpu(g.node, g.index, g.memory, g.product) for g in node.gpus
    )


def test_the_node_agents_published_memory_is_what_the_scheduler_packs_against() -> None:
    """The agent admits tenants against NVML's total less its reserve: the scheduler uses the
    same bytes, not feature discovery's label; anything it did not write whole is ignored."""
    node = ready(node_manifest(GROUP, "g"))
    annotations = node["metadata"].setdefault("annotations", {})
    annotations[wire.NODE_GPU_MEMORY_BYTES] = f"{22 * 2**30},{21 * 2**30}"
    assert [g.memory for g in gpus.node_from_object(node).gpus] == [22 * 2**30, 21 * 2**30]
    for unusable in (f"{22 * 2**30}", "22Gi,21Gi", "0,1", ""):  # one GPU short, not bytes, ...
        annotations[wire.NODE_GPU_MEMORY_BYTES] = unusable
        assert [g.memory for g in gpus.node_from_object(node).gpus] == [23034 * 2**20] * 2


def test_not_ready_or_cordoned_nodes_are_unschedulable() -> None:
    assert not gpus.node_from_object(node_manifest(GROUP, "g")).schedulable
    cordoned = ready(node_manifest(GROUP, "g"))
    cordoned["spec"]["unschedulable"] = True
    assert not gpus.node_from_object(cordoned).schedulable


def pod(
    annotations: dict[str, str], node: str | None = None, phase: str = "Running"
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "p",
            "namespace": "ns",
            "annotations": annotations,
            "labels": {wire.LABEL_SERVICE: "svc"},
        },
        "spec": {"nodeName": node} if node else {},
        "status": {"phase": phase},
    }


def test_binding_annotations_round_trip_into_the_ledger() -> None:
    allocation = Allocation("ns/p", "ns/svc", "g", 1, 5 * 2**30, 8 * 2**30)
    annotations = gpus.binding_annotations(allocation, Gpu("g", 1, 23034 * 2**20, uuid="GPU-x"))
    assert annotations[wire.POD_VISIBLE_DEVICES] == "GPU-x"
    assert gpus.pod_allocation(pod(annotations, node="g")) == allocation
    assert gpus.pod_allocation(pod(annotations)) is None  # not bound: holds nothing
    assert gpus.pod_allocation(pod(annotations, node="g", phase="Succeeded")) is None
    no_uuid = gpus.binding_annotations(allocation, Gpu("g", 1, 1))
    assert no_uuid[wire.POD_VISIBLE_DEVICES] == "1" and wire.POD_GPU_UUID not in no_uuid


def test_demands_come_from_the_template_annotations() -> None:
    assert gpus.pod_demand(pod({wire.POD_WANTS_GPU_FRACTION: "0.25"})).fraction == 0.25  # type: ignore[union-attr]
    demand = gpus.pod_demand(
        pod({wire.POD_WANTS_GPU_MEMORY: "12Gi", wire.POD_WANTS_GPU_MEMORY_LIMIT: "30Gi"})
    )
    assert demand is not None and demand.request == 12 * 2**30 and demand.limit == 30 * 2**30
    assert gpus.pod_demand(pod({})) is None


def test_host_memory_comes_from_the_node_allocatable_and_the_pod_requests() -> None:
    node = ready(node_manifest(GROUP, "g"))
    node["status"]["allocatable"] = {**node["status"].get("allocatable", {}), "memory": "64Gi"}
    assert gpus.node_from_object(node).memory == 64 * 2**30
    assert gpus.node_from_object(ready(node_manifest(GROUP, "g"))).memory == 256 * 2**30
    del node["status"]["allocatable"]["memory"]
    assert gpus.node_from_object(node).memory is None  # not said: not checked
    bound = pod({wire.POD_WANTS_GPU_FRACTION: "0.5"}, node="g")
    bound["metadata"]["annotations"].update(
        gpus.binding_annotations(Allocation("ns/p", "ns/svc", "g", 0, 1, 1), Gpu("g", 0, 1))
    )

    def requests(memory: str) -> dict[str, Any]:
        return {"resources": {"requests": {"memory": memory}}}

    # The kubelet's count: containers summed, or the largest init container when that is more.
    bound["spec"]["containers"] = [requests("6Gi"), requests("512Mi"), {}]
    bound["spec"]["initContainers"] = [requests("1Gi")]
    assert gpus.pod_resources(bound).memory == 6 * 2**30 + 2**29
    allocation = gpus.pod_allocation(bound)
    assert allocation is not None and allocation.host.memory == 6 * 2**30 + 2**29
    bound["spec"]["initContainers"] = [requests("8Gi")]
    assert gpus.pod_request(bound).host.memory == 8 * 2**30


def test_a_nodes_allocatable_cpu_and_pod_count_are_read_and_absent_ones_not_checked() -> None:
    node = ready(node_manifest(GROUP, "g"))
    assert (gpus.node_from_object(node).cpu, gpus.node_from_object(node).pods) == (32000, 110)
    for cpu, millis in (("500m", 500), ("1.5", 1500), ("2", 2000), ("0.0001", 1)):
        node["status"]["allocatable"]["cpu"] = cpu
        assert gpus.node_from_object(node).cpu == millis  # rounded up, as MilliValue does
    del node["status"]["allocatable"]["cpu"], node["status"]["allocatable"]["pods"]
    assert (gpus.node_from_object(node).cpu, gpus.node_from_object(node).pods) == (None, None)
    (planned,) = gpus.nodes_from_inventory(Inventory(nodes=[GROUP]))
    assert (planned.cpu, planned.memory, planned.pods) == (32000, 256 * 2**30, 110)


def requesting(cpu: str | None = None, memory: str | None = None, **extra: Any) -> dict[str, Any]:
    requests = {k: v for k, v in (("cpu", cpu), ("memory", memory)) if v is not None}
    return {"resources": {"requests": requests}, **extra}


def test_a_pods_node_resources_are_counted_as_the_kubelet_counts_them() -> None:
    """Containers summed; an init container counts alone when larger; a sidecar (an init
    container with restartPolicy Always) runs beside both; pod-level requests win; overhead adds."""
    spec: dict[str, Any] = {
        "containers": [requesting("500m", "1Gi"), requesting("1", None), {}],
        "initContainers": [requesting("2", "512Mi")],
    }
    p = {"metadata": {"name": "p", "namespace": "ns"}, "spec": spec, "status": {}}
    assert gpus.pod_resources(p) == Resources(cpu=2000, memory=2**30, pods=1)
    spec["initContainers"] = [
        requesting("100m", "256Mi", restartPolicy="Always"),
        requesting("2", "512Mi"),
    ]
    # running: 1.5 CPU + the sidecar's 0.1, 1Gi + 256Mi; the init step: 2 + 0.1 CPU, 768Mi
    assert gpus.pod_resources(p) == Resources(cpu=2100, memory=2**30 + 2**28)
    spec["overhead"] = {"cpu": "250m", "memory": "64Mi"}
    spec["resources"] = {"requests": {"cpu": "4"}}
    assert gpus.pod_resources(p) == Resources(cpu=4250, memory=2**30 + 2**28 + 2**26)
    assert gpus.pod_resources({"spec": {}}) == Resources(cpu=0, memory=0, pods=1)


def test_only_a_bound_unfinished_pod_occupies_a_node() -> None:
    p: dict[str, Any] = {
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {"containers": [requesting("1", "1Gi")]},
        "status": {"phase": "Pending"},
    }
    assert gpus.pod_occupancy(p) is None  # not bound: takes nothing yet
    p["spec"]["nodeName"] = "g"
    assert gpus.pod_occupancy(p) == ("g", Resources(cpu=1000, memory=2**30))
    for phase in ("Succeeded", "Failed"):
        p["status"]["phase"] = phase
        assert gpus.pod_occupancy(p) is None
