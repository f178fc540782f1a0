"""The GPU ledger: every booked GPU share, and which bookings the API server has not confirmed.

A pod's life in the ledger follows kube-scheduler's cache
(``pkg/scheduler/backend/cache/interface.go``)::

               assume            confirm (a watch event, a list or a GET shows it bound)
    Initial ---------> Assumed ---------------------------------------> Added
       ^                |   |                                              |
       |   forget       |   | finish_binding: the Binding call returned;   | remove
       +----------------+   | due() hands it back for a check once its     v
                            | deadline passes without a confirmation    Deleted

- ``assume(a)``: the scheduler chose a GPU; the share counts from this moment, before the
  Binding is sent, and it never expires while the Binding call is in flight.
- ``finish_binding(pod, deadline)``: the Binding returned (it landed, or timed out and may have
  landed); if nothing confirms the pod by ``deadline``, ``due`` returns it, and the scheduler
  asks the API server: bound means ``confirm``, unbound ``forget``, gone ``remove``. A late or
  lagging watch therefore never frees a share that is really bound (a plain expiry would).
- ``forget(pod)``: the Binding was refused for certain, or a fresh read shows the pod unbound
  after its bind returned; the share is free at once.
- ``confirm(a)``: the API server shows the pod bound with allocation ``a`` (Added).
- ``remove(pod)``: the pod was deleted or finished (Deleted).
- ``relist(allocations, unbound)``: a (re)list replaces every Added booking. An Assumed booking
  survives a list that still shows its pod unbound (a list taken before the bind landed and
  processed after it: dropping the booking there booked one GPU twice), and is dropped when the
  list shows the pod bound without an allocation or does not show it at all (deleted).

Invariant: the GPU counters (``resident``, ``total``, ``tenants``, services per GPU and node) are
always the sums over ``by_pod``, Assumed and Added alike. ``node_used`` sums the node resources of
every pod on each node, once per pod: ``by_pod``'s (so an Assumed pod counts before it is bound)
and ``on_nodes``' (every bound pod the cluster shows, any scheduler's). Berth binds its pods
itself, so kube-scheduler never checks their CPU, memory and pod count: this tally is what does.
"""

from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

GpuKey = tuple[str, int]  # (node name, device index)


@dataclass(frozen=True)
class Resources:
    """What pods take of a node as the kubelet admits them (its OutOfcpu, OutOfmemory and
    OutOfpods checks): one pod's requests, or the sum over a node's pods."""

    cpu: int = 0  # millicores
    memory: int = 0  # bytes
    pods: int = 1

    def __add__(self, other: "Resources") -> "Resources":
        return Resources(self.cpu + other.cpu, self.memory + other.memory, self.pods + other.pods)

    def __sub__(self, other: "Resources") -> "Resources":
        return Resources(self.cpu - other.cpu, self.memory - other.memory, self.pods - other.pods)


NOTHING = Resources(pods=0)
# What a GPU's reservation pod (``reservations.reservation_manifest``) takes of its node: the
# first tenant of a GPU brings one along, so placing it needs this beside its own requests.
RESERVATION = Resources(cpu=1, memory=8 << 20, pods=1)
Occupant = tuple[str, Resources]  # (node name, what the pod takes of it)


@dataclass(frozen=True)
class Allocation:
    pod: str
    service: str
    node: str
    gpu_index: int
    request: int  # bytes
    limit: int  # bytes
    standby: bool = False
    host: Resources = Resources()  # what the pod takes of its node (memory: parked weights too)

    @property
    def gpu(self) -> GpuKey:
        return (self.node, self.gpu_index)


class GpuLedger:
    """Allocations by GPU, rebuilt from bound pods' annotations plus the scheduler's own
    unconfirmed bookings (module docstring); the scheduler's only state."""

    def __init__(
        self, allocations: Iterable[Allocation] = (), on_nodes: Mapping[str, Occupant] = {}
    ) -> None:
        # pod -> (node, requests): every bound, unfinished pod the cluster shows, Berth's or not
        self.on_nodes: dict[str, Occupant] = dict(on_nodes)
        self._clear()
        for allocation in allocations:
            self.add(allocation)

    def _clear(self) -> None:
        """Drop every booking; ``on_nodes`` stays (another watch keeps it)."""
        self.by_pod: dict[str, Allocation] = {}
        self.resident: Counter[GpuKey] = Counter()  # bytes requested by resident tenants
        self.total: Counter[GpuKey] = Counter()  # bytes requested by all tenants
        self.tenants: Counter[GpuKey] = Counter()
        self.services_on_gpu: dict[GpuKey, Counter[str]] = {}
        self.services_on_node: dict[str, Counter[str]] = {}
        self.node_used: dict[str, Resources] = {}  # node -> all its pods take (docstring)
        for node, requests in self.on_nodes.values():
            self.node_used[node] = self.node_used.get(node, NOTHING) + requests
        # pod -> deadline (monotonic seconds) of an Assumed booking; None while its bind is in flight
        self.assumed: dict[str, float | None] = {}

    # ---- the counters --------------------------------------------------------------------

    def add(self, a: Allocation) -> None:
        """Book ``a`` as Added, replacing whatever the pod held before."""
        if a.pod in self.by_pod:
            self.remove(a.pod)
        before = self._occupant(a.pod)
        self.by_pod[a.pod] = a
        self._moved(before, (a.node, a.host))
        if not a.standby:
            self.resident[a.gpu] += a.request
        self.total[a.gpu] += a.request
        self.tenants[a.gpu] += 1
        self.services_on_gpu.setdefault(a.gpu, Counter())[a.service] += 1
        self.services_on_node.setdefault(a.node, Counter())[a.service] += 1

    def remove(self, pod: str) -> Allocation | None:
        """Free the pod's share, Assumed or Added (Deleted); None if it held none."""
        self.assumed.pop(pod, None)
        a = self.by_pod.pop(pod, None)
        if a is None:
            return None
        if not a.standby:
            self.resident[a.gpu] -= a.request
        self.total[a.gpu] -= a.request
        self.tenants[a.gpu] -= 1
        self.services_on_gpu[a.gpu][a.service] -= 1
        self.services_on_node[a.node][a.service] -= 1
        self._moved((a.node, a.host), self._occupant(pod))
        return a

    # ---- every pod on the nodes (another watch's feed) -----------------------------------

    def _occupant(self, pod: str) -> Occupant | None:
        """Where the pod counts: its booking if it has one, else what the cluster shows."""
        a = self.by_pod.get(pod)
        return (a.node, a.host) if a is not None else self.on_nodes.get(pod)

    def _moved(self, before: Occupant | None, after: Occupant | None) -> None:
        if before == after:
            return
        if before is not None:
            self.node_used[before[0]] -= before[1]
        if after is not None:
            self.node_used[after[0]] = self.node_used.get(after[0], NOTHING) + after[1]

    def on_node(self, pod: str, node: str, requests: Resources) -> None:
        """The cluster shows ``pod`` bound to ``node`` and not finished."""
        before = self._occupant(pod)
        self.on_nodes[pod] = (node, requests)
        self._moved(before, self._occupant(pod))

    def off_node(self, pod: str) -> Occupant | None:
        """The pod is gone or finished: what the cluster showed of it, None if nothing."""
        before = self._occupant(pod)
        gone = self.on_nodes.pop(pod, None)
        self._moved(before, self._occupant(pod))
        return gone

    def relist_nodes(self, on_nodes: Mapping[str, Occupant]) -> None:
        """A (re)list of every pod on a node replaces ``on_nodes``."""
        self.on_nodes = dict(on_nodes)
        self.node_used = {}
        for pod in self.on_nodes.keys() | self.by_pod.keys():
            self._moved(None, self._occupant(pod))

    # ---- the assumed-pod protocol --------------------------------------------------------

    def assume(self, a: Allocation) -> None:
        """Book a share the scheduler is about to bind (Initial -> Assumed)."""
        self.add(a)
        self.assumed[a.pod] = None

    def finish_binding(self, pod: str, deadline: float) -> None:
        """The Binding call returned: an Assumed pod now expires at ``deadline`` unless confirmed."""
        if pod in self.assumed:
            self.assumed[pod] = deadline

    def forget(self, pod: str) -> Allocation | None:
        """The Binding was refused for certain (Assumed -> Initial); an Added pod is kept."""
        if pod not in self.assumed:
            return None
        return self.remove(pod)

    def confirm(self, a: Allocation) -> None:
        """The API server shows the pod bound with ``a`` (Assumed or Initial -> Added)."""
        self.add(a)

    def is_assumed(self, pod: str) -> bool:
        return pod in self.assumed

    def due(self, now: float) -> list[str]:
        """Assumed pods whose deadline has passed; each is handed out once (its deadline is
        cleared) until ``finish_binding`` sets a new one, so the caller checks it exactly once."""
        due = [
            p for p, deadline in self.assumed.items() if deadline is not None and deadline <= now
        ]
        for pod in due:
            self.assumed[pod] = None
        return due

    def next_deadline(self) -> float | None:
        return min((d for d in self.assumed.values() if d is not None), default=None)

    def relist(
        self,
        allocations: Iterable[Allocation],
        unbound: Collection[str],
        keep: Collection[str] = (),
    ) -> list[str]:
        """Replace every Added booking by ``allocations`` (the bound pods of a fresh list);
        keep an Assumed booking only while its pod is in ``unbound``, and the Added booking of
        each pod in ``keep`` (seen bound before, shown unbound by a list older than its bind).
        The Assumed pods dropped."""
        kept = [
            (self.by_pod[pod], deadline)
            for pod, deadline in self.assumed.items()
            if pod in unbound and pod in self.by_pod
        ]
        kept += [(self.by_pod[p], None) for p in keep if p in self.by_pod and p not in self.assumed]
        dropped = [pod for pod in self.assumed if pod not in unbound]
        stays_added = {p for p in keep if p not in self.assumed}
        self._clear()
        for allocation in allocations:
            self.add(allocation)
        for allocation, deadline in kept:
            if allocation.pod not in self.by_pod:
                self.add(allocation)
                if allocation.pod not in stays_added:
                    self.assumed[allocation.pod] = deadline
        return dropped

    # ---- views ---------------------------------------------------------------------------

    def copy(self) -> "GpuLedger":
        """The same bookings, all as Added (a working copy for one placement pass)."""
        ledger = GpuLedger(self.by_pod.values())
        ledger.on_nodes, ledger.node_used = dict(self.on_nodes), dict(self.node_used)
        return ledger

    def used_gpus(self) -> set[GpuKey]:
        return {key for key, n in self.tenants.items() if n > 0}
