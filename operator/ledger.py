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

Invariant: the counters (``resident``, ``total``, ``tenants``, services per GPU and node, host
memory per node) are always the sums over ``by_pod``, Assumed and Added alike.
"""

from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass

GpuKey = tuple[str, int]  # (node name, device index)


@dataclass(frozen=True)
class Allocation:
    pod: str
    service: str
    node: str
    gpu_index: int
    request: int  # bytes
    limit: int  # bytes
    standby: bool = False
    host_memory: int = 0  # bytes of the node's memory the pod requests (a parked weights copy)

    @property
    def gpu(self) -> GpuKey:
        return (self.node, self.gpu_index)


class GpuLedger:
    """Allocations by GPU, rebuilt from bound pods' annotations plus the scheduler's own
    unconfirmed bookings (module docstring); the scheduler's only state."""

    def __init__(self, allocations: Iterable[Allocation] = ()) -> None:
        self._clear()
        for allocation in allocations:
            self.add(allocation)

    def _clear(self) -> None:
        self.by_pod: dict[str, Allocation] = {}
        self.resident: Counter[GpuKey] = Counter()  # bytes requested by resident tenants
        self.total: Counter[GpuKey] = Counter()  # bytes requested by all tenants
        self.tenants: Counter[GpuKey] = Counter()
        self.services_on_gpu: dict[GpuKey, Counter[str]] = {}
        self.services_on_node: dict[str, Counter[str]] = {}
        self.host_memory: Counter[str] = Counter()  # node -> bytes of memory its pods request
        # pod -> deadline (monotonic seconds) of an Assumed booking; None while its bind is in flight
        self.assumed: dict[str, float | None] = {}

    # ---- the counters --------------------------------------------------------------------

    def add(self, a: Allocation) -> None:
        """Book ``a`` as Added, replacing whatever the pod held before."""
        if a.pod in self.by_pod:
            self.remove(a.pod)
        self.by_pod[a.pod] = a
        if not a.standby:
            self.resident[a.gpu] += a.request
        self.total[a.gpu] += a.request
        self.tenants[a.gpu] += 1
        self.services_on_gpu.setdefault(a.gpu, Counter())[a.service] += 1
        self.services_on_node.setdefault(a.node, Counter())[a.service] += 1
        self.host_memory[a.node] += a.host_memory

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
        self.host_memory[a.node] -= a.host_memory
        return a

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

    def relist(self, allocations: Iterable[Allocation], unbound: Collection[str]) -> list[str]:
        """Replace every Added booking by ``allocations`` (the bound pods of a fresh list);
        keep an Assumed booking only while its pod is in ``unbound``. The Assumed pods dropped."""
        kept = [
            (self.by_pod[pod], deadline)
            for pod, deadline in self.assumed.items()
            if pod in unbound and pod in self.by_pod
        ]
        dropped = [pod for pod in self.assumed if pod not in unbound]
        self._clear()
        for allocation in allocations:
            self.add(allocation)
        for allocation, deadline in kept:
            if allocation.pod not in self.by_pod:
                self.add(allocation)
                self.assumed[allocation.pod] = deadline
        return dropped

    # ---- views ---------------------------------------------------------------------------

    def copy(self) -> "GpuLedger":
        """The same bookings, all as Added (a working copy for one placement pass)."""
        return GpuLedger(self.by_pod.values())

    def used_gpus(self) -> set[GpuKey]:
        return {key for key, n in self.tenants.items() if n > 0}
