"""Read GPU facts out of Kubernetes objects (plain dicts, as the API returns them).

Nodes give the inventory: ``nvidia.com/gpu`` capacity, the GPU product and memory labels of
NVIDIA's feature discovery, and the UUIDs that Berth's node agent annotates. Pods give demands
(annotations the reconciler puts in the pod template) and, once bound, allocations (annotations
the scheduler wrote through the Binding): so the ledger is always rebuilt from the API server.
"""

import math
from collections.abc import Iterable, Mapping
from typing import Any

from berth import wire
from berth.operator.api import quantity_bytes
from berth.operator.api_types import quantity_value
from berth.operator.inventory import Inventory
from berth.operator.placement import (
    Allocation,
    Gpu,
    GpuDemand,
    GpuLedger,
    Node,
    PodRequest,
    Resources,
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
    allocatable = status.get("allocatable") or {}
    host_memory, cpu, pods = (allocatable.get(k) for k in ("memory", "cpu", "pods"))
    return Node(
        name=name,
        gpus=gpus,
        labels=labels,
        taints=taints,
        schedulable=ready and not spec.get("unschedulable", False),
        memory=quantity_bytes(str(host_memory)) if host_memory is not None else None,
        cpu=_millis(cpu) if cpu is not None else None,
        pods=int(quantity_value(str(pods))) if pods is not None else None,
    )


def _millis(value: object) -> int:
    """A CPU quantity in millicores, rounded up as Kubernetes' MilliValue does ("1.5" -> 1500)."""
    return math.ceil(quantity_value(str(value)) * 1000)


def _agent_memory(annotations: Mapping[str, str], count: int) -> list[int] | None:
    """The bytes per GPU that Berth's node agent lets tenants share (NVML's total less its
    reserve), where it published them for every GPU: the agent admits tenants against these,
    so the scheduler packs against the same numbers rather than feature discovery's label."""
    try:
        memory = [int(b) for b in annotations.get(wire.NODE_GPU_MEMORY_BYTES, "").split(",") if b]
    except ValueError:
        return None  # not the agent's writing: the label it is
    return memory if len(memory) == count and all(b > 0 for b in memory) else None


def pod_resources(pod: Obj) -> Resources:
    """What a pod takes of its node as the kubelet counts it (Kubernetes' ``PodRequests``): its
    containers and sidecars summed, or an init container with the sidecars started before it
    when that is more; pod-level requests replace the sum where set; overhead on top."""
    spec = pod.get("spec", {})

    def requested(values: Mapping[str, Any] | None) -> Resources:
        values = values or {}
        cpu, memory = values.get("cpu"), values.get("memory")
        return Resources(
            _millis(cpu) if cpu is not None else 0,
            quantity_bytes(str(memory)) if memory is not None else 0,
            pods=0,
        )

    def of(container: Obj) -> Resources:
        return requested((container.get("resources") or {}).get("requests"))

    def most(a: Resources, b: Resources) -> Resources:
        return Resources(max(a.cpu, b.cpu), max(a.memory, b.memory), pods=0)

    running = sidecars = init = Resources(pods=0)
    for container in spec.get("containers") or []:
        running += of(container)
    for container in spec.get("initContainers") or []:
        if container.get("restartPolicy") == "Always":  # a sidecar: runs beside the containers
            running += of(container)
            sidecars += of(container)
            init = most(init, sidecars)
        else:
            init = most(init, sidecars + of(container))
    total = most(running, init)
    pod_level = (spec.get("resources") or {}).get("requests") or {}
    if pod_level:
        given = requested(pod_level)
        total = Resources(
            given.cpu if "cpu" in pod_level else total.cpu,
            given.memory if "memory" in pod_level else total.memory,
            pods=0,
        )
    overhead = requested(spec.get("overhead"))
    return Resources(total.cpu + overhead.cpu, total.memory + overhead.memory, pods=1)


def pod_occupancy(pod: Obj) -> tuple[str, Resources] | None:
    """The node a pod occupies and what it takes there; None while unbound or once finished."""
    node = pod.get("spec", {}).get("nodeName")
    if not node or pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
        return None
    return node, pod_resources(pod)


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
            nodes.append(
                Node(
                    name,
                    gpus,
                    group.node_labels(),
                    taints,
                    memory=quantity_bytes(group.memory),
                    cpu=_millis(group.cpu),
                    pods=group.pods,
                )
            )
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
        host=pod_resources(pod),
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
        host=pod_resources(pod),
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
