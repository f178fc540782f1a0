"""The shape of a cluster's nodes, as a small YAML file.

One inventory format serves three places: ``berth cluster up --nodes FILE`` creates kwok nodes
from it, the e2e tests choose their cluster with it, and ``berth plan`` places manifests onto it
without a cluster. GPU labels use the names of NVIDIA's GPU feature discovery, so the scheduler
reads simulated and real nodes alike.
"""

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from berth import wire


class Taint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str
    value: str = ""
    effect: str = Field(pattern="^(NoSchedule|PreferNoSchedule|NoExecute)$")


class NodeGroup(BaseModel):
    """``count`` identical nodes named ``{name}-0``, ``{name}-1``, ... (or ``name`` if count is 1)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=50)
    count: int = Field(default=1, ge=1, le=10_000)
    gpus: int = Field(default=0, ge=0, le=64, description="nvidia.com/gpu capacity per node")
    gpu_product: str | None = Field(default=None, alias="gpuProduct")
    gpu_memory_mib: int | None = Field(default=None, alias="gpuMemoryMiB", gt=0)
    cpu: str = "32"
    memory: str = "256Gi"
    pods: int = Field(default=110, ge=1)
    labels: dict[str, str] = Field(default_factory=dict)
    taints: list[Taint] = Field(default_factory=list)

    @model_validator(mode="after")
    def _gpu_fields_together(self) -> "NodeGroup":
        if self.gpus and (self.gpu_product is None or self.gpu_memory_mib is None):
            raise ValueError(f"node group {self.name!r} has GPUs: set gpuProduct and gpuMemoryMiB")
        if not self.gpus and (self.gpu_product or self.gpu_memory_mib):
            raise ValueError(f"node group {self.name!r} sets GPU fields but gpus is 0")
        return self

    def node_names(self) -> list[str]:
        if self.count == 1:
            return [self.name]
        return [f"{self.name}-{i}" for i in range(self.count)]

    def node_labels(self) -> dict[str, str]:
        labels = dict(self.labels)
        if self.gpus:
            labels[wire.NODE_GPU_PRODUCT] = str(self.gpu_product)
            labels[wire.NODE_GPU_MEMORY_MIB] = str(self.gpu_memory_mib)
            labels[wire.NODE_GPU_COUNT] = str(self.gpus)
        return labels


class Inventory(BaseModel):
    model_config = ConfigDict(extra="forbid")

    nodes: list[NodeGroup] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> "Inventory":
        names = [n for group in self.nodes for n in group.node_names()]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate node names: {', '.join(duplicates)}")
        return self

    @property
    def gpu_count(self) -> int:
        return sum(group.count * group.gpus for group in self.nodes)


DEFAULT_INVENTORY = Inventory.model_validate(
    {
        "nodes": [
            {
                "name": "gpu-node",
                "count": 4,
                "gpus": 8,
                "gpuProduct": "NVIDIA-H100-80GB-HBM3",
                "gpuMemoryMiB": 81559,
                "cpu": "192",
                "memory": "2Ti",
            },
            {"name": "cpu-node", "count": 1, "cpu": "32", "memory": "128Gi"},
        ]
    }
)


def load_inventory(path: Path) -> Inventory:
    """Read an inventory file; a bad file raises ValueError naming the file and the field."""
    try:
        data: Any = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"cannot read inventory {path}: {error}") from error
    try:
        return Inventory.model_validate(data)
    except ValueError as error:
        raise ValueError(f"invalid inventory {path}: {error}") from error
