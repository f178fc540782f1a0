"""Where a pod's GPU share goes: the pure placement core of Berth's GPU scheduler.

``place(nodes, ledger, requests, policy)`` takes plain data and returns decisions; the scheduler
(``scheduler.py``) and ``berth plan`` both call it. The memory model (ARCHITECTURE section 4):
per GPU of capacity C, the requests of *resident* tenants never exceed ``C - reserve``; standby
tenants hold no GPU memory, so all tenants together may reach ``overcommit x (C - reserve)``.

Best-fit decreasing: a batch is sorted by memory request (largest first); each pod goes to the
feasible GPU that ranks best on (replicas of its service already on that node, GPU still empty,
memory left after it, node, index). So replicas of one service spread across nodes first, a new
GPU is opened only when no used one fits, and among used GPUs the tightest fit wins. Two replicas
of one service never share a GPU. Every tie is broken by name, so the result is deterministic.
"""

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

GpuKey = tuple[str, int]  # (node name, device index)


@dataclass(frozen=True)
class Taint:
    key: str
    value: str
    effect: str  # NoSchedule | PreferNoSchedule | NoExecute


@dataclass(frozen=True)
class Toleration:
    key: str | None = None
    operator: str = "Equal"  # Equal | Exists
    value: str | None = None
    effect: str | None = None

    def tolerates(self, taint: Taint) -> bool:
        if self.effect and self.effect != taint.effect:
            return False
        if self.operator == "Exists":
            return not self.key or self.key == taint.key
        return self.key == taint.key and (self.value or "") == taint.value


@dataclass(frozen=True)
class Gpu:
    node: str
    index: int
    memory: int  # bytes
    product: str = ""
    uuid: str | None = None

    @property
    def key(self) -> GpuKey:
        return (self.node, self.index)


@dataclass(frozen=True)
class Node:
    name: str
    gpus: tuple[Gpu, ...]
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()
    schedulable: bool = True  # False when cordoned or not Ready


@dataclass(frozen=True)
class GpuDemand:
    """What a pod asks of one GPU: a fraction of its memory, or absolute bytes."""

    fraction: float | None = None
    request: int | None = None  # bytes
    limit: int | None = None  # bytes; None means the request

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.request is None):
            raise ValueError("a GPU demand is a fraction or a memory request, not both")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.request is not None and (
            self.request <= 0 or (self.limit or self.request) < self.request
        ):
            raise ValueError(f"need 0 < request <= limit, got {self.request}, {self.limit}")

    def request_on(self, capacity: int) -> int:
        if self.fraction is not None:
            return math.floor(self.fraction * capacity)
        assert self.request is not None
        return self.request

    def limit_on(self, capacity: int) -> int:
        if self.fraction is not None:
            return self.request_on(capacity)
        return min(self.limit or self.request_on(capacity), capacity)


@dataclass(frozen=True)
class PodRequest:
    pod: str  # namespace/name
    service: str  # namespace/service: replicas of one service spread
    demand: GpuDemand
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    standby: bool = False


@dataclass(frozen=True)
class Allocation:
    pod: str
    service: str
    node: str
    gpu_index: int
    request: int  # bytes
    limit: int  # bytes
    standby: bool = False

    @property
    def gpu(self) -> GpuKey:
        return (self.node, self.gpu_index)


@dataclass(frozen=True)
class PlacementPolicy:
    reserve: int = 0  # bytes kept free on every GPU (CUDA contexts, the node agent)
    standby_overcommit: float = 2.0  # all tenants' requests may reach this x schedulable memory


@dataclass(frozen=True)
class Decision:
    request: PodRequest
    allocation: Allocation | None
    reason: str = ""  # why it did not fit, for the pod's event and the service's condition


class GpuLedger:
    """Allocations by GPU, rebuilt from bound pods' annotations; the scheduler's only state."""

    def __init__(self, allocations: Iterable[Allocation] = ()) -> None:
        self.by_pod: dict[str, Allocation] = {}
        self.resident: Counter[GpuKey] = Counter()  # bytes requested by resident tenants
        self.total: Counter[GpuKey] = Counter()  # bytes requested by all tenants
        self.tenants: Counter[GpuKey] = Counter()
        self.services_on_gpu: dict[GpuKey, Counter[str]] = {}
        self.services_on_node: dict[str, Counter[str]] = {}
        for allocation in allocations:
            self.add(allocation)

    def add(self, a: Allocation) -> None:
        if a.pod in self.by_pod:
            self.remove(a.pod)
        self.by_pod[a.pod] = a
        if not a.standby:
            self.resident[a.gpu] += a.request
        self.total[a.gpu] += a.request
        self.tenants[a.gpu] += 1
        self.services_on_gpu.setdefault(a.gpu, Counter())[a.service] += 1
        self.services_on_node.setdefault(a.node, Counter())[a.service] += 1

    def remove(self, pod: str) -> Allocation | None:
        a = self.by_pod.pop(pod, None)
        if a is None:
            return None
        if not a.standby:
            self.resident[a.gpu] -= a.request
        self.total[a.gpu] -= a.request
        self.tenants[a.gpu] -= 1
        self.services_on_gpu[a.gpu][a.service] -= 1
        self.services_on_node[a.node][a.service] -= 1
        return a

    def copy(self) -> "GpuLedger":
        return GpuLedger(self.by_pod.values())

    def used_gpus(self) -> set[GpuKey]:
        return {key for key, n in self.tenants.items() if n > 0}


def eligible(node: Node, request: PodRequest) -> bool:
    """Node-level filters: schedulable, selector labels match, hard taints tolerated."""
    if not node.schedulable or not node.gpus:
        return False
    if any(node.labels.get(k) != v for k, v in request.node_selector.items()):
        return False
    return all(
        taint.effect == "PreferNoSchedule" or any(t.tolerates(taint) for t in request.tolerations)
        for taint in node.taints
    )


def best_gpu(
    nodes: Iterable[Node],
    ledger: GpuLedger,
    request: PodRequest,
    policy: PlacementPolicy,
) -> Allocation | None:
    """The best feasible GPU for one pod, by looking at every GPU: the definition of the ranking
    (module docstring). ``FreeIndex.best`` finds the same GPU without the full scan."""
    best: tuple[int, int, int, str, int] | None = None
    chosen: Allocation | None = None
    service = request.service
    for node in nodes:
        if not eligible(node, request):
            continue
        on_node = ledger.services_on_node.get(node.name)
        same_on_node = on_node[service] if on_node else 0
        for gpu in node.gpus:
            key = gpu.key
            on_gpu = ledger.services_on_gpu.get(key)
            if on_gpu and on_gpu[service]:
                continue
            usable = gpu.memory - policy.reserve
            need = request.demand.request_on(gpu.memory)
            total_after = ledger.total[key] + need
            if total_after > usable * policy.standby_overcommit:
                continue
            resident_after = ledger.resident[key] + (0 if request.standby else need)
            if resident_after > usable:
                continue
            rank = (
                same_on_node,
                0 if ledger.tenants[key] else 1,
                usable - resident_after,
                node.name,
                gpu.index,
            )
            if best is None or rank < best:
                best = rank
                chosen = Allocation(
                    pod=request.pod,
                    service=service,
                    node=node.name,
                    gpu_index=gpu.index,
                    request=need,
                    limit=request.demand.limit_on(gpu.memory),
                    standby=request.standby,
                )
    return chosen


def decreasing(requests: Iterable[PodRequest], reference_capacity: int) -> list[PodRequest]:
    """Largest memory request first; ties by pod name, so every run sorts alike."""
    return sorted(requests, key=lambda r: (-r.demand.request_on(reference_capacity), r.pod))


def place(
    nodes: Iterable[Node],
    ledger: GpuLedger,
    requests: Iterable[PodRequest],
    policy: PlacementPolicy = PlacementPolicy(),
) -> list[Decision]:
    """Best-fit decreasing placement of a batch; ``ledger`` is not modified."""
    from berth.operator.free_index import FreeIndex  # the fast path; imports this module

    nodes = sorted(nodes, key=lambda n: n.name)
    working = ledger.copy()
    index = FreeIndex(nodes, working, policy)
    capacity = max((g.memory for n in nodes for g in n.gpus), default=0)
    decisions = []
    for request in decreasing(requests, capacity):
        allocation = index.best(request)
        if allocation is None:
            decisions.append(Decision(request, None, unplaceable_reason(nodes, working, request)))
        else:
            index.add(allocation)
            decisions.append(Decision(request, allocation))
    return decisions


def unplaceable_reason(nodes: Iterable[Node], ledger: GpuLedger, request: PodRequest) -> str:
    """A message in the style of kube-scheduler's: what ruled each node out."""
    nodes = list(nodes)
    candidates = [n for n in nodes if eligible(n, request)]
    gpu_nodes = [n for n in nodes if n.gpus]
    if not gpu_nodes:
        return "no nodes with GPUs"
    if not candidates:
        return (
            f"0/{len(gpu_nodes)} GPU nodes match: node selector {dict(request.node_selector)}, "
            "untolerated taints, or cordoned"
        )
    free = max(
        (g.memory - ledger.resident[g.key] for n in candidates for g in n.gpus),
        default=0,
    )
    need = request.demand.request_on(max(g.memory for n in candidates for g in n.gpus))
    return (
        f"0/{sum(len(n.gpus) for n in candidates)} GPUs fit: needs {need / 2**30:.1f} GiB, "
        f"the most free on a matching GPU is {free / 2**30:.1f} GiB"
    )


def lower_bound_gpus(demands: Iterable[GpuDemand], capacity: int) -> int:
    """Fewest GPUs of one capacity that could hold these requests (Martello-Toth L1/L2 style).

    No packing can beat ``ceil(sum / C)``, nor give two requests larger than C/2 one GPU.
    """
    sizes = [d.request_on(capacity) for d in demands]
    by_volume = math.ceil(sum(sizes) / capacity) if capacity else 0
    large = sum(1 for s in sizes if 2 * s > capacity)
    return max(by_volume, large)
