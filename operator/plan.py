"""``berth plan``: the scheduler's placement, dry-run, on manifests and an inventory file.

Pods are made exactly as the cluster would make them: the reconciler's ``render`` produces the
Deployment, each replica is its pod template, and ``gpus.pod_request`` reads it like the
scheduler does. So a plan and the live scheduler agree on the same input.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

from berth.operator import api, gpus, render
from berth.operator.placement import (
    Decision,
    GpuLedger,
    Node,
    PlacementPolicy,
    PodRequest,
    lower_bound_gpus,
    place,
)
from berth.operator.settings import OperatorSettings

GIB = 2**30


def load_services(texts: Iterable[str]) -> list[api.InferenceService]:
    """InferenceServices from YAML documents (other kinds are skipped); ValueError names the bad one."""
    services = []
    for text in texts:
        for doc in yaml.safe_load_all(text):
            if not doc or doc.get("kind") != api.KIND:
                continue
            meta = doc.get("metadata") or {}
            try:
                services.append(api.InferenceService.model_validate(doc))
            except ValidationError as error:
                raise ValueError(f"InferenceService {meta.get('name')!r}: {error}") from error
    return services


def pod_requests(service: api.InferenceService) -> list[PodRequest]:
    """One request per desired replica, read from the rendered pod template."""
    meta = {"namespace": "default", "uid": "plan", **service.metadata}
    service = service.model_copy(update={"metadata": meta})
    template = render.deployment(service, OperatorSettings())["spec"]["template"]
    requests = []
    for i in range(service.spec.desired_replicas()):
        pod_meta = {
            **template["metadata"],
            "name": f"{meta['name']}-{i}",
            "namespace": meta["namespace"],
        }
        requests.append(gpus.pod_request({"metadata": pod_meta, "spec": template["spec"]}))
    return requests


@dataclass
class Plan:
    nodes: list[Node]
    decisions: list[Decision]

    @property
    def ledger(self) -> GpuLedger:
        return GpuLedger(d.allocation for d in self.decisions if d.allocation)

    def lower_bound(self) -> int:
        capacity = max((g.memory for n in self.nodes for g in n.gpus), default=0)
        return lower_bound_gpus((d.request.demand for d in self.decisions), capacity)


def make_plan(
    nodes: list[Node], services: list[api.InferenceService], policy: PlacementPolicy
) -> Plan:
    requests = [r for s in services for r in pod_requests(s)]
    return Plan(nodes, place(nodes, GpuLedger(), requests, policy))


def format_plan(plan: Plan) -> str:
    """A table of every GPU that holds something, then totals and what did not fit."""
    ledger = plan.ledger
    rows: list[tuple[str, ...]] = [("NODE", "GPU", "PRODUCT", "USED", "CAPACITY", "TENANTS")]
    tenants: dict[tuple[str, int], list[str]] = {}
    for allocation in sorted(ledger.by_pod.values(), key=lambda a: (a.gpu, a.pod)):
        tenants.setdefault(allocation.gpu, []).append(
            f"{allocation.pod.split('/', 1)[1]} ({allocation.request / GIB:.1f}Gi)"
        )
    for node in plan.nodes:
        for gpu in node.gpus:
            if gpu.key not in tenants:
                continue
            used = ledger.resident[gpu.key]
            rows.append((node.name, str(gpu.index), gpu.product, f"{used / GIB:.1f}Gi",
                         f"{gpu.memory / GIB:.1f}Gi", ", ".join(tenants[gpu.key])))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5]
        for r in rows
    ]
    placed = sum(1 for d in plan.decisions if d.allocation)
    lines.append("")
    lines.append(
        f"{placed}/{len(plan.decisions)} pods placed on {len(ledger.used_gpus())} GPUs "
        f"(lower bound {plan.lower_bound()})"
    )
    for decision in plan.decisions:
        if decision.allocation is None:
            lines.append(f"UNPLACED {decision.request.pod}: {decision.reason}")
    return "\n".join(lines)


def plan_summary(plan: Plan) -> dict[str, Any]:
    """The plan as data (``--output yaml``)."""
    return {
        "gpusUsed": len(plan.ledger.used_gpus()),
        "lowerBound": plan.lower_bound(),
        "placements": [
            {"pod": d.request.pod, "node": d.allocation.node, "gpu": d.allocation.gpu_index,
             "requestBytes": d.allocation.request}
            if d.allocation else {"pod": d.request.pod, "unplaced": d.reason}
            for d in plan.decisions
        ],
    }  # fmt: skip
