"""The ledger's assumed-pod protocol: assume / finish_binding / forget / confirm / remove /
relist / due, against a model of the state diagram in ``ledger.py``."""

from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from berth.operator.ledger import NOTHING, Allocation, GpuLedger, Resources

GIB = 2**30
PODS = [f"ns/p{i}" for i in range(5)]
GPUS = [("n0", 0), ("n0", 1), ("n1", 0)]
NODES = ["n0", "n1", "n2"]


def allocation(pod: str, gpu: tuple[str, int], gib: int, standby: bool = False) -> Allocation:
    host = Resources(cpu=100 * gib, memory=gib)
    return Allocation(pod, f"ns/s-{pod}", gpu[0], gpu[1], gib * GIB, gib * GIB, standby, host)


def test_a_list_taken_before_a_bind_keeps_the_assumed_share() -> None:
    ledger = GpuLedger()
    ledger.assume(allocation("ns/a", ("n0", 0), 44))
    ledger.finish_binding("ns/a", deadline=100.0)
    ledger.relist([], unbound={"ns/a"})  # the list still shows ns/a pending
    assert ledger.resident[("n0", 0)] == 44 * GIB and ledger.is_assumed("ns/a")


def test_a_list_without_the_pod_or_showing_it_finished_drops_the_assumed_share() -> None:
    ledger = GpuLedger()
    ledger.assume(allocation("ns/a", ("n0", 0), 44))
    assert ledger.relist([], unbound=set()) == ["ns/a"]
    assert not ledger.used_gpus() and not ledger.is_assumed("ns/a")


def test_an_assumed_share_is_due_for_a_check_only_after_its_bind_returned_and_its_deadline() -> (
    None
):
    ledger = GpuLedger()
    ledger.assume(allocation("ns/a", ("n0", 0), 10))
    assert ledger.due(now=1e12) == []  # bind still in flight: never due
    ledger.finish_binding("ns/a", deadline=50.0)
    assert ledger.due(now=49.0) == [] and ledger.next_deadline() == 50.0
    assert ledger.due(now=50.0) == ["ns/a"]
    assert ledger.due(now=51.0) == []  # handed out once; still booked while it is checked
    assert ledger.is_assumed("ns/a") and ledger.used_gpus() == {("n0", 0)}


def test_a_confirmed_share_replaces_the_assumed_one_and_never_expires() -> None:
    ledger = GpuLedger()
    ledger.assume(allocation("ns/a", ("n0", 0), 10))
    ledger.finish_binding("ns/a", deadline=1.0)
    ledger.confirm(allocation("ns/a", ("n0", 1), 12))  # the API server knows better
    assert ledger.due(now=2.0) == []
    assert ledger.resident[("n0", 0)] == 0 and ledger.resident[("n0", 1)] == 12 * GIB
    assert ledger.forget("ns/a") is None  # forget never frees a confirmed share


class LedgerMachine(RuleBasedStateMachine):
    """Random interleavings of the protocol; the ledger must match a plain model of it."""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = GpuLedger()
        self.now = 0.0
        self.model: dict[
            str, tuple[Allocation, str, float | None]
        ] = {}  # pod -> (a, state, deadline)
        self.on_nodes: dict[str, tuple[str, Resources]] = {}  # what the all-pods watch shows

    @rule(pod=st.sampled_from(PODS), node=st.sampled_from(NODES), cpu=st.integers(0, 4000))
    def on_node(self, pod: str, node: str, cpu: int) -> None:
        self.ledger.on_node(pod, node, Resources(cpu=cpu))
        self.on_nodes[pod] = (node, Resources(cpu=cpu))

    @rule(pod=st.sampled_from(PODS))
    def off_node(self, pod: str) -> None:
        assert self.ledger.off_node(pod) == self.on_nodes.pop(pod, None)

    @rule(
        shown=st.dictionaries(
            st.sampled_from(PODS), st.tuples(st.sampled_from(NODES), st.integers(0, 4000))
        )
    )
    def relist_nodes(self, shown: dict[str, tuple[str, int]]) -> None:
        self.on_nodes = {p: (n, Resources(cpu=c)) for p, (n, c) in shown.items()}
        self.ledger.relist_nodes(self.on_nodes)

    @rule(
        pod=st.sampled_from(PODS),
        gpu=st.sampled_from(GPUS),
        gib=st.integers(1, 40),
        standby=st.booleans(),
    )
    def assume(self, pod: str, gpu: tuple[str, int], gib: int, standby: bool) -> None:
        if pod in self.model:
            return  # the scheduler assumes only pods it holds nothing for
        a = allocation(pod, gpu, gib, standby)
        self.ledger.assume(a)
        self.model[pod] = (a, "assumed", None)

    @rule(pod=st.sampled_from(PODS), ttl=st.floats(0, 10))
    def finish_binding(self, pod: str, ttl: float) -> None:
        self.ledger.finish_binding(pod, self.now + ttl)
        if pod in self.model and self.model[pod][1] == "assumed":
            self.model[pod] = (self.model[pod][0], "assumed", self.now + ttl)

    @rule(pod=st.sampled_from(PODS))
    def forget(self, pod: str) -> None:
        self.ledger.forget(pod)
        if pod in self.model and self.model[pod][1] == "assumed":
            del self.model[pod]

    @rule(pod=st.sampled_from(PODS), gpu=st.sampled_from(GPUS), gib=st.integers(1, 40))
    def confirm(self, pod: str, gpu: tuple[str, int], gib: int) -> None:
        a = allocation(pod, gpu, gib)
        self.ledger.confirm(a)
        self.model[pod] = (a, "added", None)

    @rule(pod=st.sampled_from(PODS))
    def remove(self, pod: str) -> None:
        self.ledger.remove(pod)
        self.model.pop(pod, None)

    @rule(dt=st.floats(0, 5))
    def due(self, dt: float) -> None:
        self.now += dt
        due = self.ledger.due(self.now)
        expected = [
            p
            for p, (_, s, d) in self.model.items()
            if s == "assumed" and d is not None and d <= self.now
        ]
        assert sorted(due) == sorted(expected)
        for pod in due:
            self.model[pod] = (self.model[pod][0], "assumed", None)

    @rule(
        bound=st.dictionaries(
            st.sampled_from(PODS), st.tuples(st.sampled_from(GPUS), st.integers(1, 40))
        ),
        unbound=st.sets(st.sampled_from(PODS)),
    )
    def relist(self, bound: dict[str, tuple[tuple[str, int], int]], unbound: set[str]) -> None:
        unbound -= set(bound)
        self.ledger.relist([allocation(p, g, gib) for p, (g, gib) in bound.items()], unbound)
        model = {p: (allocation(p, g, gib), "added", None) for p, (g, gib) in bound.items()}
        for pod, entry in self.model.items():
            if entry[1] == "assumed" and pod in unbound:
                model[pod] = entry  # a stale list never drops a share that is being bound
        self.model = model

    @invariant()
    def matches_the_model(self) -> None:
        assert self.ledger.by_pod == {p: a for p, (a, _, _) in self.model.items()}
        assert set(self.ledger.assumed) == {
            p for p, (_, s, _) in self.model.items() if s == "assumed"
        }
        resident: Counter[tuple[str, int]] = Counter()
        total: Counter[tuple[str, int]] = Counter()
        for a, _, _ in self.model.values():
            total[a.gpu] += a.request
            if not a.standby:
                resident[a.gpu] += a.request
        assert +self.ledger.resident == +resident and +self.ledger.total == +total
        assert self.ledger.used_gpus() == {a.gpu for a, _, _ in self.model.values()}

    @invariant()
    def every_pod_on_a_node_counts_once_booked_or_shown(self) -> None:
        used: dict[str, Resources] = {}
        for pod in self.model.keys() | self.on_nodes.keys():
            a = self.model[pod][0] if pod in self.model else None
            node, host = (a.node, a.host) if a is not None else self.on_nodes[pod]
            used[node] = used.get(node, NOTHING) + host
        for ledger in (self.ledger, self.ledger.copy()):
            assert {n: r for n, r in ledger.node_used.items() if r != NOTHING} == {
                n: r for n, r in used.items() if r != NOTHING
            }


LedgerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)
test_the_ledger_follows_the_assumed_pod_state_diagram = LedgerMachine.TestCase
