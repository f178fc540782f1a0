"""Node objects for kwok, rendered from an inventory.

kwok manages only nodes annotated ``kwok.x-k8s.io/node: fake``: it heartbeats them, marks them
Ready and runs the pods bound to them. GPU nodes get ``nvidia.com/gpu`` capacity and GPU feature
discovery labels, plus the GPU UUID annotation that Berth's node agent writes on real nodes.
"""

import uuid
from typing import Any

from berth import wire
from berth.operator.inventory import Inventory, NodeGroup

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
_UUID_NAMESPACE = uuid.UUID("6f1c3a52-5d0e-4b8e-9a53-3c1d2b7e8f00")


def gpu_uuids(node_name: str, count: int) -> list[str]:
    """Stable, unique per node and index, in NVIDIA's ``GPU-<uuid>`` spelling."""
    return [f"GPU-{uuid.uuid5(_UUID_NAMESPACE, f'{node_name}/{i}')}" for i in range(count)]


def node_manifest(group: NodeGroup, name: str) -> dict[str, Any]:
    resources: dict[str, str] = {
        "cpu": group.cpu,
        "memory": group.memory,
        "pods": str(group.pods),
    }
    annotations = {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"}
    if group.gpus:
        resources[wire.GPU_RESOURCE] = str(group.gpus)
        annotations[wire.NODE_GPU_UUIDS] = ",".join(gpu_uuids(name, group.gpus))
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "node-role.kubernetes.io/agent": "",
        "type": "kwok",
        **group.node_labels(),
    }
    spec: dict[str, Any] = {}
    if group.taints:
        spec["taints"] = [t.model_dump() for t in group.taints]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": spec,
        "status": {"capacity": resources, "allocatable": resources},
    }


def node_manifests(inventory: Inventory) -> list[dict[str, Any]]:
    return [node_manifest(group, name) for group in inventory.nodes for name in group.node_names()]
