"""The placement core: capacity, spread, selectors, determinism and packing quality."""

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from berth.operator.ledger import RESERVATION
from berth.operator.placement import (
    Allocation,
    Gpu,
    GpuDemand,
    GpuLedger,
    Node,
    PlacementPolicy,
    PodRequest,
    Resources,
    Taint,
    Toleration,
    best_gpu,
    decreasing,
    lower_bound_gpus,
    place,
)

GIB = 2**30
MIB_8 = RESERVATION.memory
CAP = 80 * GIB
EIGHTHS = [k / 8 for k in range(1, 9)]


def cluster(nodes: int, gpus: int = 8, labels: dict[str, str] | None = None) -> list[Node]:
    return [
        Node(f"n{i}", tuple(Gpu(f"n{i}", g, CAP) for g in range(gpus)), labels or {})
        for i in range(nodes)
    ]


def requests(fractions: list[float], replicas: int = 1) -> list[PodRequest]:
    return [
        PodRequest(f"ns/s{i}-{r}", f"ns/s{i}", GpuDemand(fraction=f))
        for i, f in enumerate(fractions)
        for r in range(replicas)
    ]


def check_invariants(nodes: list[Node], ledger: GpuLedger, policy: PlacementPolicy) -> None:
    for node in nodes:
        for gpu in node.gpus:
            assert ledger.resident[gpu.key] <= gpu.memory - policy.reserve
            assert (
                ledger.total[gpu.key] <= (gpu.memory - policy.reserve) * policy.standby_overcommit
            )
            services = ledger.services_on_gpu.get(gpu.key, {})
            assert all(n <= 1 for n in services.values()), f"two replicas share {gpu.key}"


def placed(decisions: list) -> GpuLedger:  # type: ignore[type-arg]
    return GpuLedger(d.allocation for d in decisions if d.allocation)


@settings(max_examples=200, deadline=None)
@given(
    fractions=st.lists(st.sampled_from(EIGHTHS), min_size=1, max_size=40),
    replicas=st.integers(1, 3),
    reserve_gib=st.sampled_from([0, 1]),
)
def test_no_gpu_is_over_capacity_and_replicas_never_share_a_gpu(
    fractions: list[float], replicas: int, reserve_gib: int
) -> None:
    nodes = cluster(3, gpus=4)
    policy = PlacementPolicy(reserve=reserve_gib * GIB)
    decisions = place(nodes, GpuLedger(), requests(fractions, replicas), policy)
    check_invariants(nodes, placed(decisions), policy)
    assert len(decisions) == len(fractions) * replicas


@settings(max_examples=100, deadline=None)
@given(
    fractions=st.lists(st.sampled_from(EIGHTHS), min_size=1, max_size=30), seed=st.integers(0, 1000)
)
def test_placement_is_deterministic_whatever_the_input_order(
    fractions: list[float], seed: int
) -> None:
    nodes = cluster(3, gpus=4)
    batch = requests(fractions, replicas=2)
    shuffled_nodes, shuffled_batch = nodes[:], batch[:]
    random.Random(seed).shuffle(shuffled_nodes)
    random.Random(seed).shuffle(shuffled_batch)
    first = {d.request.pod: d.allocation for d in place(nodes, GpuLedger(), batch)}
    second = {
        d.request.pod: d.allocation for d in place(shuffled_nodes, GpuLedger(), shuffled_batch)
    }
    assert first == second


def test_replicas_spread_across_nodes_before_doubling_up() -> None:
    nodes = cluster(4, gpus=2)
    decisions = place(nodes, GpuLedger(), requests([0.25], replicas=4))
    assert sorted(d.allocation.node for d in decisions if d.allocation) == ["n0", "n1", "n2", "n3"]
    # A fifth replica has no node left to itself: it shares a node, never a GPU.
    decisions = place(nodes, GpuLedger(), requests([0.25], replicas=5))
    ledger = placed(decisions)
    assert len(ledger.by_pod) == 5
    check_invariants(nodes, ledger, PlacementPolicy())


def test_best_fit_fills_the_tightest_used_gpu_before_opening_one() -> None:
    nodes = cluster(1, gpus=3)
    ledger = GpuLedger(
        [
            Allocation("ns/a", "ns/a", "n0", 0, int(0.5 * CAP), int(0.5 * CAP)),
            Allocation("ns/b", "ns/b", "n0", 1, int(0.75 * CAP), int(0.75 * CAP)),
        ]
    )
    (decision,) = place(nodes, ledger, [PodRequest("ns/c", "ns/c", GpuDemand(fraction=0.25))])
    assert decision.allocation is not None and decision.allocation.gpu_index == 1


def test_node_selector_and_taints_are_respected() -> None:
    plain = Node("plain", (Gpu("plain", 0, CAP),), {"nvidia.com/gpu.product": "A100"})
    tainted = Node(
        "tainted",
        (Gpu("tainted", 0, CAP),),
        {"nvidia.com/gpu.product": "H100"},
        (Taint("dedicated", "llm", "NoSchedule"),),
    )
    want_h100 = PodRequest(
        "ns/x", "ns/x", GpuDemand(fraction=0.5), {"nvidia.com/gpu.product": "H100"}
    )
    (refused,) = place([plain, tainted], GpuLedger(), [want_h100])
    assert refused.allocation is None and "match" in refused.reason
    tolerant = PodRequest(
        "ns/x", "ns/x", GpuDemand(fraction=0.5), {"nvidia.com/gpu.product": "H100"},
        (Toleration("dedicated", "Equal", "llm", "NoSchedule"),),
    )  # fmt: skip
    (accepted,) = place([plain, tainted], GpuLedger(), [tolerant])
    assert accepted.allocation is not None and accepted.allocation.node == "tainted"


def test_cordoned_nodes_get_nothing() -> None:
    node = Node("n0", (Gpu("n0", 0, CAP),), schedulable=False)
    (decision,) = place([node], GpuLedger(), requests([0.5]))
    assert decision.allocation is None


def test_memory_requests_place_absolute_bytes_and_cap_the_limit() -> None:
    nodes = cluster(1, gpus=1)
    demand = GpuDemand(request=30 * GIB, limit=200 * GIB)
    (decision,) = place(nodes, GpuLedger(), [PodRequest("ns/m", "ns/m", demand)])
    assert decision.allocation is not None
    assert decision.allocation.request == 30 * GIB and decision.allocation.limit == CAP


def test_standby_tenants_overcommit_up_to_the_factor_but_residents_do_not() -> None:
    nodes = cluster(1, gpus=1)
    ledger = GpuLedger([Allocation("ns/a", "ns/a", "n0", 0, CAP, CAP)])
    resident = PodRequest("ns/b", "ns/b", GpuDemand(fraction=0.5))
    standby = PodRequest("ns/c", "ns/c", GpuDemand(fraction=0.5), standby=True)
    policy = PlacementPolicy(standby_overcommit=1.5)
    decisions = {d.request.pod: d for d in place(nodes, ledger, [resident, standby], policy)}
    assert decisions["ns/b"].allocation is None
    assert decisions["ns/c"].allocation is not None
    too_many = [
        PodRequest(f"ns/s{i}", f"ns/s{i}", GpuDemand(fraction=0.5), standby=True) for i in range(2)
    ]
    assert sum(d.allocation is not None for d in place(nodes, ledger, too_many, policy)) == 1


def test_an_unplaceable_pod_gets_a_reason_naming_the_shortfall() -> None:
    nodes = cluster(1, gpus=1)
    ledger = GpuLedger([Allocation("ns/a", "ns/a", "n0", 0, int(0.75 * CAP), int(0.75 * CAP))])
    (decision,) = place(nodes, ledger, requests([0.5]))
    assert decision.allocation is None
    assert "needs 40.0 GiB" in decision.reason and "20.0 GiB" in decision.reason


def optimum(sizes: list[int], capacity: int) -> int:
    """Fewest bins, by trying every assignment (tiny inputs only)."""
    best = len(sizes)

    def search(i: int, bins: list[int]) -> None:
        nonlocal best
        if len(bins) >= best:
            return
        if i == len(sizes):
            best = len(bins)
            return
        for b in range(len(bins)):
            if bins[b] + sizes[i] <= capacity:
                bins[b] += sizes[i]
                search(i + 1, bins)
                bins[b] -= sizes[i]
        search(i + 1, [*bins, sizes[i]])

    search(0, [])
    return best


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
def test_exhaustively_within_one_gpu_of_optimal_on_small_workloads(count: int) -> None:
    sizes = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0]
    for fractions in itertools.combinations_with_replacement(sizes, count):
        nodes = cluster(2, gpus=3)
        decisions = place(nodes, GpuLedger(), requests(list(fractions)))
        ledger = placed(decisions)
        assert len(ledger.by_pod) == count
        best = optimum([round(f * 8) for f in fractions], 8)
        assert len(ledger.used_gpus()) <= best + 1, fractions
        check_invariants(nodes, ledger, PlacementPolicy())


def test_random_workloads_pack_within_three_percent_of_the_lower_bound() -> None:
    rng = random.Random(7)
    ratios = []
    for _ in range(20):
        fractions = [rng.choice(EIGHTHS) for _ in range(rng.randint(50, 150))]
        demands = [GpuDemand(fraction=f) for f in fractions]
        bound = lower_bound_gpus(demands, CAP)
        nodes = cluster(math.ceil(bound / 8) + 4)
        ledger = placed(place(nodes, GpuLedger(), requests(fractions)))
        assert len(ledger.by_pod) == len(fractions)
        assert len(ledger.used_gpus()) <= math.ceil(11 / 9 * bound) + 1  # BFD's worst case
        ratios.append(len(ledger.used_gpus()) / bound)
    assert sum(ratios) / len(ratios) <= 1.03, ratios


def test_lower_bound_counts_volume_and_large_items() -> None:
    assert lower_bound_gpus([GpuDemand(fraction=0.5)] * 3, CAP) == 2
    assert lower_bound_gpus([GpuDemand(fraction=0.625)] * 3, CAP) == 3
    assert lower_bound_gpus([], CAP) == 0


def test_ledger_add_and_remove_are_inverse() -> None:
    a = Allocation("ns/a", "ns/s", "n0", 0, 10, 10)
    ledger = GpuLedger([a])
    assert ledger.remove("ns/a") == a and ledger.remove("ns/a") is None
    assert ledger.resident[("n0", 0)] == 0 and not ledger.used_gpus()


@settings(max_examples=150, deadline=None)
@given(
    fractions=st.lists(st.sampled_from(EIGHTHS), min_size=1, max_size=40),
    replicas=st.integers(1, 3),
    selective=st.booleans(),
)
def test_the_free_memory_index_chooses_exactly_what_the_full_scan_chooses(
    fractions: list[float], replicas: int, selective: bool
) -> None:
    nodes = [
        Node(
            f"n{i}",
            tuple(Gpu(f"n{i}", g, CAP if i % 2 else CAP // 2) for g in range(3)),
            {"zone": str(i % 2)},
        )
        for i in range(4)
    ]
    batch = [
        PodRequest(r.pod, r.service, r.demand, {"zone": "1"} if selective and i % 3 == 0 else {})
        for i, r in enumerate(requests(fractions, replicas))
    ]
    policy = PlacementPolicy(reserve=GIB)
    fast = {d.request.pod: d.allocation for d in place(nodes, GpuLedger(), batch, policy)}
    ledger = GpuLedger()
    for request in decreasing(batch, CAP):
        naive = best_gpu(nodes, ledger, request, policy)
        assert naive == fast[request.pod], request
        if naive:
            ledger.add(naive)


@settings(max_examples=100, deadline=None)
@given(
    fractions=st.lists(st.sampled_from(EIGHTHS[:4]), min_size=1, max_size=12),
    replicas=st.integers(1, 4),
)
def test_replicas_land_on_distinct_nodes_whenever_there_is_room(
    fractions: list[float], replicas: int
) -> None:
    nodes = cluster(4, gpus=8)  # 32 GPUs; the workload asks for at most 24 GPUs' worth
    ledger = placed(place(nodes, GpuLedger(), requests(fractions, replicas)))
    by_service: dict[str, list[str]] = {}
    for allocation in ledger.by_pod.values():
        by_service.setdefault(allocation.service, []).append(allocation.node)
    assert all(len(set(n)) == len(n) == replicas for n in by_service.values())


# ---- the reserve: fractions are of the usable memory (capacity - reserve) -----------------

RESERVE = PlacementPolicy(reserve=2 * GIB)


def test_with_a_reserve_a_whole_gpu_fraction_fits_an_empty_gpu() -> None:
    (decision,) = place(cluster(1, gpus=1), GpuLedger(), requests([1.0]), RESERVE)
    assert decision.allocation is not None, decision.reason
    assert decision.allocation.request == decision.allocation.limit == CAP - 2 * GIB


def test_with_a_reserve_two_halves_share_one_gpu() -> None:
    decisions = place(cluster(1, gpus=1), GpuLedger(), requests([0.5, 0.5]), RESERVE)
    assert all(d.allocation is not None for d in decisions), [d.reason for d in decisions]
    assert sum(d.allocation.request for d in decisions if d.allocation) <= CAP - 2 * GIB


def test_a_memory_limit_is_capped_at_the_usable_memory() -> None:
    demand = GpuDemand(request=30 * GIB, limit=200 * GIB)
    (decision,) = place(
        cluster(1, gpus=1), GpuLedger(), [PodRequest("ns/m", "ns/m", demand)], RESERVE
    )
    assert decision.allocation is not None and decision.allocation.limit == CAP - 2 * GIB


def test_the_no_fit_message_measures_need_and_free_memory_after_the_reserve() -> None:
    usable = CAP - 2 * GIB
    taken = Allocation("ns/a", "ns/a", "n0", 0, int(0.75 * usable), int(0.75 * usable))
    (decision,) = place(cluster(1, gpus=1), GpuLedger([taken]), requests([0.5]), RESERVE)
    assert decision.allocation is None
    assert "needs 39.0 GiB of 78.0 GiB usable after a 2.0 GiB reserve" in decision.reason
    assert "the most free is 19.5 GiB" in decision.reason


def test_the_no_fit_message_names_a_gpu_refused_for_holding_a_replica_not_for_memory() -> None:
    # The GPU has room, but the service already has a replica there: the message must not claim
    # a memory shortfall that the numbers beside it contradict.
    first = Allocation("ns/s0-0", "ns/s0", "n0", 0, int(0.25 * CAP), int(0.25 * CAP))
    second = PodRequest("ns/s0-1", "ns/s0", GpuDemand(fraction=0.25))
    (decision,) = place(cluster(1, gpus=1), GpuLedger([first]), [second])
    assert decision.allocation is None
    assert decision.reason == "0/1 GPUs fit: 1 already hold a replica of ns/s0"


@settings(max_examples=100, deadline=None)
@given(
    fractions=st.lists(st.sampled_from(EIGHTHS), min_size=1, max_size=24),
    reserve_gib=st.integers(0, 8),
)
def test_with_any_reserve_fractions_pack_as_they_would_on_a_smaller_gpu_without_one(
    fractions: list[float], reserve_gib: int
) -> None:
    """Fractions are of capacity - reserve, so the reserve changes the byte sizes but never
    which fractions fit together."""
    with_reserve = place(
        cluster(2, gpus=2),
        GpuLedger(),
        requests(fractions),
        PlacementPolicy(reserve=reserve_gib * GIB),
    )
    smaller = [
        Node(f"n{i}", tuple(Gpu(f"n{i}", g, CAP - reserve_gib * GIB) for g in range(2)))
        for i in range(2)
    ]
    without = place(smaller, GpuLedger(), requests(fractions))
    assert [(d.request.pod, d.allocation and d.allocation.gpu) for d in with_reserve] == [
        (d.request.pod, d.allocation and d.allocation.gpu) for d in without
    ]


def test_host_memory_bounds_the_pods_a_node_takes_and_the_reason_says_so() -> None:
    """A standby tenant's pinned weights live in host memory: a node whose allocatable memory
    cannot hold one more is skipped, and when none can, the reason gives the numbers."""
    nodes = [
        Node("n0", tuple(Gpu("n0", g, CAP) for g in range(4)), memory=40 * GIB),
        Node("n1", tuple(Gpu("n1", g, CAP) for g in range(4)), memory=16 * GIB + MIB_8),
    ]
    batch = [
        PodRequest(
            f"ns/s{i}", f"ns/s{i}", GpuDemand(fraction=0.25), host=Resources(memory=16 * GIB)
        )
        for i in range(4)
    ]
    decisions = {d.request.pod: d for d in place(nodes, GpuLedger(), batch)}
    by_node = [d.allocation.node for d in decisions.values() if d.allocation]
    assert sorted(by_node) == ["n0", "n0", "n1"]
    (refused,) = [d for d in decisions.values() if d.allocation is None]
    assert refused.reason == (
        "0/2 matching nodes have room for the pod: Insufficient memory on 2 nodes "
        "(needs 16.0 GiB, the most free is 8.0 GiB)"
    )
    placed_ledger = placed(list(decisions.values()))
    # each node's first tenant books its GPU's reservation pod beside itself
    assert placed_ledger.node_used == {
        "n0": Resources(memory=32 * GIB, pods=2) + RESERVATION,
        "n1": Resources(memory=16 * GIB, pods=1) + RESERVATION,
    }
    # Nodes that do not say their memory, and pods that request none, are not held back.
    unknown = [Node("n9", (Gpu("n9", 0, CAP),))]
    assert all(d.allocation for d in place(unknown, GpuLedger(), batch[:1]))


@settings(max_examples=100, deadline=None)
@given(
    fractions=st.lists(st.sampled_from(EIGHTHS[:4]), min_size=1, max_size=16),
    host_gib=st.lists(st.sampled_from([0, 4, 8, 16]), min_size=16, max_size=16),
)
def test_the_free_memory_index_honours_host_memory_as_the_full_scan_does(
    fractions: list[float], host_gib: list[int]
) -> None:
    nodes = [
        Node(f"n{i}", tuple(Gpu(f"n{i}", g, CAP) for g in range(2)), memory=(8 + 8 * i) * GIB)
        for i in range(3)
    ]
    batch = [
        PodRequest(r.pod, r.service, r.demand, host=Resources(memory=host_gib[i] * GIB))
        for i, r in enumerate(requests(fractions))
    ]
    fast = {d.request.pod: d.allocation for d in place(nodes, GpuLedger(), batch)}
    ledger = GpuLedger()
    for request in decreasing(batch, CAP):
        naive = best_gpu(nodes, ledger, request, PlacementPolicy())
        assert naive == fast[request.pod], request
        if naive:
            ledger.add(naive)
    for node in nodes:
        used = ledger.node_used.get(node.name, Resources())
        assert node.memory is not None and used.memory <= node.memory


# ---- the node's CPU, memory and pod count: every pod there counts, Berth's or not ----------


def cpu_node(name: str, cpu: int | None, pods: int | None = None, gpus: int = 2) -> Node:
    return Node(name, tuple(Gpu(name, g, CAP) for g in range(gpus)), cpu=cpu, pods=pods)


def cpu_request(pod: str, millis: int, fraction: float = 0.25) -> PodRequest:
    return PodRequest(pod, pod, GpuDemand(fraction=fraction), host=Resources(cpu=millis))


def test_a_node_short_of_cpu_is_skipped_and_the_reason_names_cpu() -> None:
    """Another scheduler's pod holds most of n0's CPU: Berth's pod goes to n1, and once n1 is
    full too, the reason says CPU was short, with the numbers."""
    nodes = [cpu_node("n0", cpu=4000), cpu_node("n1", cpu=8000)]
    ledger = GpuLedger(on_nodes={"web/nginx": ("n0", Resources(cpu=3500))})
    (first,) = place(nodes, ledger, [cpu_request("ns/a", 2000)])
    assert first.allocation is not None and first.allocation.node == "n1"
    ledger.add(first.allocation)
    (refused,) = place(nodes, ledger, [cpu_request("ns/b", 7000)])
    assert refused.allocation is None
    assert refused.reason == (
        "0/2 matching nodes have room for the pod: Insufficient cpu on 2 nodes "
        "(needs 7 CPU, the most free is 5.999 CPU)"  # 1m: n1's GPU reservation pod
    )


def test_a_finished_or_deleted_pod_no_longer_holds_its_cpu() -> None:
    nodes = [cpu_node("n0", cpu=4000)]
    ledger = GpuLedger(on_nodes={"web/job": ("n0", Resources(cpu=4000))})
    assert place(nodes, ledger, [cpu_request("ns/a", 1000)])[0].allocation is None
    assert ledger.off_node("web/job") == ("n0", Resources(cpu=4000))
    assert place(nodes, ledger, [cpu_request("ns/a", 1000)])[0].allocation is not None


def test_two_pods_of_one_batch_do_not_both_take_the_last_cpu() -> None:
    nodes = [cpu_node("n0", cpu=4000)]
    decisions = place(nodes, GpuLedger(), [cpu_request("ns/a", 3000), cpu_request("ns/b", 3000)])
    assert [d.allocation is not None for d in decisions] == [True, False]
    assert "Insufficient cpu on 1 node (needs 3 CPU, the most free is 0.999 CPU)" in (
        decisions[1].reason
    )


def test_a_full_node_takes_no_more_pods_and_a_node_that_says_nothing_is_not_limited() -> None:
    nodes = [cpu_node("n0", cpu=None, pods=4, gpus=4)]  # the proxy, a GPU's reservation, 2 pods
    ledger = GpuLedger(on_nodes={"kube-system/proxy": ("n0", Resources())})
    decisions = place(nodes, ledger, [cpu_request(f"ns/s{i}", 0) for i in range(3)])
    assert sum(d.allocation is not None for d in decisions) == 2
    (refused,) = [d for d in decisions if d.allocation is None]
    assert refused.reason.endswith("Insufficient pods on 1 node (no pod slot left)")
    unlimited = [cpu_node("n0", cpu=None, pods=None, gpus=4)]
    batch = [cpu_request(f"ns/s{i}", 64000) for i in range(4)]
    assert all(d.allocation for d in place(unlimited, ledger, batch))


def test_a_pod_counts_once_though_it_is_booked_and_the_cluster_shows_it_too() -> None:
    """Berth's own bound pods are in its ledger and in the watch of every pod on a node."""
    ledger = GpuLedger([Allocation("ns/a", "ns/a", "n0", 0, GIB, GIB, host=Resources(cpu=3000))])
    ledger.on_node("ns/a", "n0", Resources(cpu=3000))
    assert ledger.node_used["n0"] == Resources(cpu=3000, pods=1)
    ledger.remove("ns/a")  # the ledger lets go first: the cluster still shows it
    assert ledger.node_used["n0"] == Resources(cpu=3000, pods=1)
    ledger.off_node("ns/a")
    assert ledger.node_used["n0"] == Resources(cpu=0, pods=0)
    assert ledger.copy().node_used == ledger.node_used


@settings(max_examples=150, deadline=None)
@given(
    cpus=st.lists(st.sampled_from([None, 2000, 4000, 8000]), min_size=3, max_size=3),
    pods=st.lists(st.sampled_from([None, 2, 3, 5]), min_size=3, max_size=3),
    others=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 4000)), max_size=6),
    batch=st.lists(
        st.tuples(st.sampled_from(EIGHTHS[:4]), st.integers(1, 3000), st.integers(0, 16)),
        min_size=1,
        max_size=16,
    ),
)
def test_no_node_is_placed_past_its_allocatable_and_the_index_agrees_with_the_scan(
    cpus: list[int | None],
    pods: list[int | None],
    others: list[tuple[int, int]],
    batch: list[tuple[float, int, int]],
) -> None:
    nodes = [
        Node(f"n{i}", tuple(Gpu(f"n{i}", g, CAP) for g in range(3)), memory=16 * GIB,
             cpu=cpus[i], pods=pods[i])
        for i in range(3)
    ]  # fmt: skip
    on_nodes = {f"other/p{k}": (f"n{n}", Resources(cpu=c)) for k, (n, c) in enumerate(others)}
    requests = [
        PodRequest(f"ns/s{i}", f"ns/s{i}", GpuDemand(fraction=f), host=Resources(c, m * GIB))
        for i, (f, c, m) in enumerate(batch)
    ]
    fast = {d.request.pod: d for d in place(nodes, GpuLedger(on_nodes=on_nodes), requests)}
    ledger = GpuLedger(on_nodes=on_nodes)
    before = dict(ledger.node_used)
    for request in decreasing(requests, CAP):
        naive = best_gpu(nodes, ledger, request, PlacementPolicy())
        assert naive == fast[request.pod].allocation, request
        if naive:
            ledger.add(naive)
        else:
            assert fast[request.pod].reason
    for node in nodes:
        if ledger.node_used.get(node.name) == before.get(node.name):
            continue  # nothing placed here (others alone may be past it)
        used = ledger.node_used[node.name]
        assert node.cpu is None or used.cpu <= node.cpu
        assert node.memory is None or used.memory <= node.memory
        assert node.pods is None or used.pods <= node.pods


def test_a_gpus_first_tenant_needs_room_for_its_reservation_pod_too() -> None:
    """The first tenant of a GPU brings the GPU's reservation pod (a pod slot, 1m CPU, 8 MiB):
    on a node with one slot left an empty GPU cannot be opened, and the reason says why, but a
    GPU that already has a tenant (and its reservation) takes the pod. Two first tenants placed
    in one pass book two reservations."""
    nodes = [cpu_node("n0", cpu=None, pods=3, gpus=2)]
    others = {"kube-system/proxy": ("n0", Resources()), "web/a": ("n0", Resources())}
    (refused,) = place(nodes, GpuLedger(on_nodes=others), [cpu_request("ns/a", 0)])
    assert refused.allocation is None
    assert refused.reason == (
        "0/2 GPUs fit: 2 empty on nodes without room for the GPU's reservation pod beside the "
        "pod (1m CPU, 8 MiB, a pod slot)"
    )
    tenant = Allocation("ns/t", "ns/t", "n0", 1, GIB, GIB)  # GPU 1's tenant and its reservation
    ledger = GpuLedger([tenant], on_nodes={"kube-system/proxy": ("n0", Resources())})
    ledger.on_node("berth-system/gpu-n0-1-x", "n0", RESERVATION)
    one_left = [cpu_node("n0", cpu=None, pods=4, gpus=2)]
    (placed_one,) = place(one_left, ledger, [cpu_request("ns/a", 0)])
    assert placed_one.allocation is not None and placed_one.allocation.gpu == ("n0", 1)
    assert placed_one.allocation.host == Resources()  # not a first tenant: no reservation
    roomy = [cpu_node("n0", cpu=None, pods=4, gpus=2)]  # 2 first tenants + 2 reservations
    half = [cpu_request(f"ns/h{i}", 0, fraction=0.75) for i in range(2)]
    decisions = place(roomy, GpuLedger(), half)
    assert [d.allocation is not None for d in decisions] == [True, True]
    assert placed(decisions).node_used["n0"] == Resources(cpu=2, memory=16 << 20, pods=4)
    tight = [cpu_node("n0", cpu=None, pods=3, gpus=2)]
    assert [d.allocation is not None for d in place(tight, GpuLedger(), half)] == [True, False]
    # With reservations off (BERTH_GPU_RESERVATIONS=false) there is none to plan for.
    off = PlacementPolicy(reservation=Resources(pods=0))
    (alone,) = place(nodes, GpuLedger(on_nodes=others), [cpu_request("ns/a", 0)], off)
    assert alone.allocation is not None and alone.allocation.host == Resources()
