"""Read GPU facts out of Kubernetes objects (plain dicts, as the API returns them).

Nodes give the inventory: ``nvidia.com/gpu`` capacity, the GPU product and memory labels of
NVIDIA's feature discovery, and the UUIDs that Berth's node agent annotates. Pods give demands
(annotations the reconciler puts in the pod template) and, once bound, allocations (annotations
the scheduler wrote through the Binding): so the ledger is always rebuilt from the API server.
"""

from collections.abc import Iterable, Mapping
from typing import Any

from berth import wire
from berth.operator.api import quantity_bytes
from berth.operator.inventory import Inventory
from berth.operator.placement import (
    Allocation,
    Gpu,
    GpuDemand,
    GpuLedger,
    Node,
    PodRequest,
    Taint,
    Toleration,
)
from berth.operator.status import condition

MIB = 2**20

Obj = Mapping[str, Any]


def _meta(obj: Obj, key: str) -> dict[str, str]:
    return obj.get("metadata", {}).get(key) or {}


def pod_key(pod: Obj) -> str:
    meta = pod["metadata"]
    return f"{meta.get('namespace', 'default')}/{meta['name']}"


def node_from_object(node: Obj) -> Node:
    """A Node object's GPUs; a node without the labels or capacity has none."""
    name = node["metadata"]["name"]
    labels = _meta(node, "labels")
    status = node.get("status", {})
    count = int(
        (status.get("allocatable") or status.get("capacity") or {}).get(wire.GPU_RESOURCE, 0)
    )
    memory_mib = labels.get(wire.NODE_GPU_MEMORY_MIB)
    gpus: tuple[Gpu, ...] = ()
    if count and memory_mib:
        annotations = _meta(node, "annotations")
        uuids = [u for u in annotations.get(wire.NODE_GPU_UUIDS, "").split(",") if u]
        memory = _agent_memory(annotations, count) or [int(memory_mib) * MIB] * count
        gpus = tuple(
            Gpu(
                node=name,
                index=i,
                memory=memory[i],
                product=labels.get(wire.NODE_GPU_PRODUCT, ""),
                uuid=uuids[i] if len(uuids) == count else None,
            )
            for i in range(count)
        )
    spec = node.get("spec", {})
    taints = tuple(
        Taint(t["key"], t.get("value", ""), t["effect"]) for t in spec.get("taints") or []
    )
    ready = condition(node, "Ready").get("status") == "True"
    memory = (status.get("allocatable") or {}).get("memory")
    return Node(
        name=name,
        gpus=gpus,
        labels=labels,
        taints=taints,
        schedulable=ready and not spec.get("unschedulable", False),
        memory=quantity_bytes(memory) if memory else None,
    )


def _agent_memory(annotations: Mapping[str, str], count: int) -> list[int] | None:
    """The bytes per GPU that Berth's node agent lets tenants share (NVML's total less its
    reserve), where it published them for every GPU: the agent admits tenants against these,
    so the scheduler packs against the same numbers rather than feature discovery's label."""
    try:
        memory = [int(b) for b in annotations.get(wire.NODE_GPU_MEMORY_BYTES, "").split(",") if b]
    except ValueError:
        return None  # not the agent's writing: the label it is
    return memory if len(memory) == count and all(b > 0 for b in memory) else None


def pod_host_memory(pod: Obj) -> int:
    """The memory a pod requests of its node, as the kubelet counts it: its containers' requests
    summed, or its largest init container's when that is more."""
    spec = pod.get("spec", {})

    def requested(container: Obj) -> int:
        value = ((container.get("resources") or {}).get("requests") or {}).get("memory")
        return quantity_bytes(str(value)) if value else 0

    running = sum(requested(c) for c in spec.get("containers") or [])
    return max([running, *(requested(c) for c in spec.get("initContainers") or [])])


def nodes_from_inventory(inventory: Inventory) -> list[Node]:
    """The nodes an inventory file describes, as ``berth plan`` sees them (all Ready)."""
    nodes = []
    for group in inventory.nodes:
        taints = tuple(Taint(t.key, t.value, t.effect) for t in group.taints)
        for name in group.node_names():
            gpus = tuple(
                Gpu(name, i, (group.gpu_memory_mib or 0) * MIB, group.gpu_product or "")
                for i in range(group.gpus)
            )
            memory = quantity_bytes(group.memory) if group.memory else None
            nodes.append(Node(name, gpus, group.node_labels(), taints, memory=memory))
    return nodes


def pod_demand(pod: Obj) -> GpuDemand | None:
    """What the pod asks of a GPU, from the reconciler's annotations; None if it asks nothing."""
    annotations = _meta(pod, "annotations")
    fraction = annotations.get(wire.POD_WANTS_GPU_FRACTION)
    if fraction is not None:
        return GpuDemand(fraction=float(fraction))
    memory = annotations.get(wire.POD_WANTS_GPU_MEMORY)
    if memory is not None:
        limit = annotations.get(wire.POD_WANTS_GPU_MEMORY_LIMIT)
        return GpuDemand(
            request=quantity_bytes(memory), limit=quantity_bytes(limit) if limit else None
        )
    return None


def pod_service(pod: Obj) -> str:
    """The spread group: the owning InferenceService, or the pod itself."""
    namespace = pod["metadata"].get("namespace", "default")
    return f"{namespace}/{_meta(pod, 'labels').get(wire.LABEL_SERVICE) or pod['metadata']['name']}"


def pod_request(pod: Obj) -> PodRequest:
    """A pending pod as a placement request; raises ValueError when its demand is missing or bad."""
    demand = pod_demand(pod)
    if demand is None:
        raise ValueError(
            f"pod has neither {wire.POD_WANTS_GPU_FRACTION} nor {wire.POD_WANTS_GPU_MEMORY} annotation"
        )
    spec = pod.get("spec", {})
    tolerations = tuple(
        Toleration(t.get("key"), t.get("operator", "Equal"), t.get("value"), t.get("effect"))
        for t in spec.get("tolerations") or []
    )
    return PodRequest(
        pod=pod_key(pod),
        service=pod_service(pod),
        demand=demand,
        node_selector=spec.get("nodeSelector") or {},
        tolerations=tolerations,
        standby=_meta(pod, "annotations").get(wire.POD_STANDBY) == "true",
        host_memory=pod_host_memory(pod),
    )


def pod_allocation(pod: Obj) -> Allocation | None:
    """The GPU share a bound pod holds, from the annotations its Binding wrote."""
    node = pod.get("spec", {}).get("nodeName")
    annotations = _meta(pod, "annotations")
    index = annotations.get(wire.POD_GPU_INDEX)
    if not node or index is None or wire.POD_GPU_MEMORY_REQUEST not in annotations:
        return None
    if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
        return None  # a finished pod holds nothing
    request = _count(annotations, wire.POD_GPU_MEMORY_REQUEST)
    return Allocation(
        pod=pod_key(pod),
        service=pod_service(pod),
        node=node,
        gpu_index=_count(annotations, wire.POD_GPU_INDEX),
        request=request,
        limit=_count(annotations, wire.POD_GPU_MEMORY_LIMIT, request),
        standby=annotations.get(wire.POD_STANDBY) == "true",
        host_memory=pod_host_memory(pod),
    )


def _count(annotations: Mapping[str, str], key: str, default: int | None = None) -> int:
    """A non-negative integer annotation (bytes, an index); ValueError naming it otherwise."""
    value = annotations.get(key)
    if value is None and default is not None:
        return default
    if value is None or not value.isdigit():
        raise ValueError(f"annotation {key}={value!r} is not a whole number (bytes or an index)")
    return int(value)


def ledger_from_pods(pods: Iterable[Obj]) -> GpuLedger:
    return GpuLedger(a for a in map(pod_allocation, pods) if a is not None)


def binding_annotations(allocation: Allocation, gpu: Gpu) -> dict[str, str]:
    """The annotations a Binding sets on the pod together with its node (one atomic write)."""
    annotations = {
        wire.POD_GPU_INDEX: str(allocation.gpu_index),
        wire.POD_GPU_MEMORY_REQUEST: str(allocation.request),
        wire.POD_GPU_MEMORY_LIMIT: str(allocation.limit),
        wire.POD_VISIBLE_DEVICES: gpu.uuid or str(gpu.index),
    }
    if gpu.uuid:
        annotations[wire.POD_GPU_UUID] = gpu.uuid
    return annotations
