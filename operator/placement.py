"""Where a pod's GPU share goes: the pure placement core of Berth's GPU scheduler.

``place(nodes, ledger, requests, policy)`` takes plain data and returns decisions; the scheduler
(``scheduler.py``) and ``berth plan`` both call it. The memory model (ARCHITECTURE section 4):
per GPU of capacity C, the requests of *resident* tenants never exceed the usable memory
``U = C - reserve``; standby tenants hold no GPU memory, so all tenants together may reach
``overcommit x U``. Fractions are of U, not of C: ``fraction: 1`` is the whole usable GPU, two
halves share one GPU, and a memory limit is capped at U.

Best-fit decreasing: a batch is sorted by memory request (largest first); each pod goes to the
feasible GPU that ranks best on (replicas of its service already on that node, GPU still empty,
memory left after it, node, index). So replicas of one service spread across nodes first, a new
GPU is opened only when no used one fits, and among used GPUs the tightest fit wins. Two replicas
of one service never share a GPU. Every tie is broken by name, so the result is deterministic.
"""

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from berth.operator.ledger import NOTHING, RESERVATION
from berth.operator.ledger import Allocation as Allocation  # re-exported for callers
from berth.operator.ledger import GpuKey as GpuKey
from berth.operator.ledger import GpuLedger as GpuLedger
from berth.operator.ledger import Resources as Resources


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
    # allocatable host resources (None: not reported, not checked, as on some kwok nodes)
    memory: int | None = None  # bytes
    cpu: int | None = None  # millicores
    pods: int | None = None


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
    # what it takes of its node (memory: its parked weights too)
    host: Resources = field(default_factory=Resources)


@dataclass(frozen=True)
class PlacementPolicy:
    reserve: int = 0  # bytes kept free on every GPU (CUDA contexts, the node agent)
    standby_overcommit: float = 2.0  # all tenants' requests may reach this x schedulable memory
    # what a GPU's first tenant brings along on its node (NOTHING with reservations off)
    reservation: Resources = RESERVATION

    def usable(self, capacity: int) -> int:
        """The bytes of a GPU of ``capacity`` that tenants may book; fractions are of this."""
        return max(0, capacity - self.reserve)


@dataclass(frozen=True)
class Decision:
    request: PodRequest
    allocation: Allocation | None
    reason: str = ""  # why it did not fit, for the pod's event and the service's condition


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


def short_of(
    node: Node, ledger: GpuLedger, request: PodRequest, extra: Resources = NOTHING
) -> list[str]:
    """The node resources (cpu, memory, pods) that cannot take this pod, and ``extra`` beside
    it, next to every pod on the node, Berth's or not, bound or assumed; checked as
    kube-scheduler's NodeResourcesFit does (a zero request always fits). Berth binds its pods
    itself, so nothing else checks this: the kubelet would refuse the pod instead (OutOfcpu,
    OutOfmemory, OutOfpods). ``extra`` is ``RESERVATION`` for a GPU's first tenant."""
    used, need = ledger.node_used.get(node.name, NOTHING), request.host + extra
    short = []
    if node.cpu is not None and need.cpu and used.cpu + need.cpu > node.cpu:
        short.append("cpu")
    if node.memory is not None and need.memory and used.memory + need.memory > node.memory:
        short.append("memory")
    if node.pods is not None and used.pods + need.pods > node.pods:
        short.append("pods")
    return short


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
        if not eligible(node, request) or short_of(node, ledger, request):
            continue
        on_node = ledger.services_on_node.get(node.name)
        same_on_node = on_node[service] if on_node else 0
        reservation_fits = not short_of(node, ledger, request, policy.reservation)
        for gpu in node.gpus:
            key = gpu.key
            on_gpu = ledger.services_on_gpu.get(key)
            if on_gpu and on_gpu[service]:
                continue
            if not ledger.tenants[key] and not reservation_fits:
                continue  # its first tenant brings the GPU's reservation pod along
            usable = policy.usable(gpu.memory)
            need = request.demand.request_on(usable)
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
                    limit=request.demand.limit_on(usable),
                    standby=request.standby,
                    host=first_tenant_host(request, ledger.tenants[key] == 0, policy),
                )
    return chosen


def first_tenant_host(request: PodRequest, first: bool, policy: PlacementPolicy) -> Resources:
    """What an allocation books on its node: the pod's requests, and for a GPU's first tenant
    its reservation pod too, until the ledger sees the bound pod and the reservation pod (which
    the binder makes before it binds) on their own. So two first tenants placed in one pass
    count two reservations."""
    return request.host + policy.reservation if first else request.host


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
    capacity = policy.usable(max((g.memory for n in nodes for g in n.gpus), default=0))
    decisions = []
    for request in decreasing(requests, capacity):
        allocation = index.best(request)
        if allocation is None:
            reason = unplaceable_reason(nodes, working, request, policy)
            decisions.append(Decision(request, None, reason))
        else:
            index.add(allocation)
            decisions.append(Decision(request, allocation))
    return decisions


def unplaceable_reason(
    nodes: Iterable[Node],
    ledger: GpuLedger,
    request: PodRequest,
    policy: PlacementPolicy = PlacementPolicy(),
) -> str:
    """A message in the style of kube-scheduler's: what ruled each node and GPU out.

    Each GPU of a matching node is counted under the first rule it breaks, with the numbers that
    rule compares, all measured as ``best_gpu`` measures them (usable memory, after the reserve).
    """
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
    roomy = [n for n in candidates if not short_of(n, ledger, request)]
    if not roomy:
        return f"0/{len(candidates)} matching nodes have room for the pod: " + "; ".join(
            _insufficient(candidates, ledger, request)
        )
    candidates = roomy
    no_reservation = {n.name for n in roomy if short_of(n, ledger, request, policy.reservation)}
    gpus = [g for n in candidates for g in n.gpus]
    same_service = too_small = overcommitted = unreserved = 0
    short: tuple[int, int, int] | None = None  # (free, need, usable) of the GPU closest to fitting
    for gpu in gpus:
        usable = policy.usable(gpu.memory)
        need = request.demand.request_on(usable)
        on_gpu = ledger.services_on_gpu.get(gpu.key)
        if on_gpu and on_gpu[request.service]:
            same_service += 1
        elif not ledger.tenants[gpu.key] and gpu.node in no_reservation:
            unreserved += 1
        elif ledger.total[gpu.key] + need > usable * policy.standby_overcommit:
            overcommitted += 1
        else:
            too_small += 1
            free = usable - ledger.resident[gpu.key]
            if short is None or free - need > short[0] - short[1]:
                short = (free, need, usable)
    parts = []
    if too_small and short is not None:
        free, need, usable = short
        reserve = f" after a {policy.reserve / 2**30:.1f} GiB reserve" if policy.reserve else ""
        parts.append(
            f"{too_small} too little free memory (needs {need / 2**30:.1f} GiB of "
            f"{usable / 2**30:.1f} GiB usable{reserve}; the most free is {free / 2**30:.1f} GiB)"
        )
    if same_service:
        parts.append(f"{same_service} already hold a replica of {request.service}")
    if overcommitted:
        parts.append(f"{overcommitted} at the standby overcommit limit")
    if unreserved:
        parts.append(
            f"{unreserved} empty on nodes without room for the GPU's reservation pod beside the "
            f"pod ({policy.reservation.cpu}m CPU, {policy.reservation.memory >> 20} MiB, a pod "
            "slot)"
        )
    return f"0/{len(gpus)} GPUs fit: " + "; ".join(parts)


def _insufficient(nodes: list[Node], ledger: GpuLedger, request: PodRequest) -> list[str]:
    """Per short resource, how many nodes lack it, with the pod's need and the most any has."""
    parts = []
    for resource in ("cpu", "memory", "pods"):
        short = [n for n in nodes if resource in short_of(n, ledger, request)]
        if not short:
            continue
        plural = "s" if len(short) > 1 else ""
        if resource == "pods":
            parts.append(f"Insufficient pods on {len(short)} node{plural} (no pod slot left)")
            continue
        free = max(
            max(
                0,
                (getattr(n, resource) or 0)
                - getattr(ledger.node_used.get(n.name, NOTHING), resource),
            )
            for n in short
        )
        need = getattr(request.host, resource)
        if resource == "cpu":
            numbers = f"needs {need / 1000:g} CPU, the most free is {free / 1000:g} CPU"
        else:
            numbers = f"needs {need / 2**30:.1f} GiB, the most free is {free / 2**30:.1f} GiB"
        parts.append(f"Insufficient {resource} on {len(short)} node{plural} ({numbers})")
    return parts


def lower_bound_gpus(demands: Iterable[GpuDemand], capacity: int) -> int:
    """Fewest GPUs of one capacity that could hold these requests (Martello-Toth L1/L2 style).

    No packing can beat ``ceil(sum / C)``, nor give two requests larger than C/2 one GPU.
    """
    sizes = [d.request_on(capacity) for d in demands]
    by_volume = math.ceil(sum(sizes) / capacity) if capacity else 0
    large = sum(1 for s in sizes if 2 * s > capacity)
    return max(by_volume, large)
