"""Which pods a service routes to, parks and wakes (operator/routing.py): examples, then the
invariants over any set of replicas (hypothesis)."""

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from berth import wire
from berth.operator.routing import DELETION_COST, Plan, Replica, plan, pod_patch

NOW, DRAIN = 1000.0, 4.0


def pods(*specs: tuple[str, bool, bool, float]) -> list[Replica]:
    """(name, routed, parked, in flight); unrouted ones left the rotation long ago."""
    return [Replica(n, r, p, f, unrouted_since=None if r else 0.0) for n, r, p, f in specs]


def test_the_busiest_resident_pods_stay_routed_and_the_rest_leave_the_rotation() -> None:
    three = pods(("a", True, False, 1), ("b", True, False, 3), ("c", True, False, 0))
    got = plan(three, 1, standby=True, hold=False, now=NOW, drain_s=DRAIN)
    assert got == Plan(unroute=frozenset({"a", "c"}))


def test_one_pod_stays_routed_at_zero_active_so_a_request_can_wake_it() -> None:
    two = pods(("a", True, True, 0), ("b", True, True, 0))
    assert plan(two, 0, standby=True, hold=False, now=NOW, drain_s=DRAIN) == Plan(
        unroute=frozenset({"b"})
    )


def test_at_zero_active_the_pod_kept_for_routing_parks_once_idle_and_stays_routed() -> None:
    """The decision wants none active: the routed pod parks at once (no drain: it stays in the
    rotation, and the next request wakes it) instead of holding its GPU share until its own
    idle timeout; not while it serves, while its metrics are unread, or while held."""
    idle = Replica("a", True, False, 0)
    assert plan([idle], 0, standby=True, hold=False, now=NOW, drain_s=DRAIN) == Plan(
        park=frozenset({"a"})
    )
    for busy_or_unknown in (replace(idle, in_flight=1), replace(idle, known=False)):
        assert plan([busy_or_unknown], 0, standby=True, hold=False, now=NOW, drain_s=DRAIN) == (
            Plan()
        )
    assert plan([idle], 0, standby=True, hold=True, now=NOW, drain_s=DRAIN) == Plan()
    assert plan([idle], 1, standby=True, hold=False, now=NOW, drain_s=DRAIN) == Plan()
    assert plan([idle], 0, standby=False, hold=False, now=NOW, drain_s=DRAIN) == Plan()
    # With a parked pod beside it, the resident one is kept in the rotation and parks too.
    two = [replace(idle, routed=False, unrouted_since=NOW - 1), Replica("b", True, True, 0)]
    assert plan(two, 0, standby=True, hold=False, now=NOW, drain_s=DRAIN) == Plan(
        route=frozenset({"a"}), unroute=frozenset({"b"}), park=frozenset({"a"})
    )


def test_an_idle_resident_pod_out_of_the_rotation_for_the_drain_time_parks() -> None:
    routed = Replica("a", True, False, 2)
    idle = Replica("b", False, False, 0, unrouted_since=NOW - DRAIN)
    draining = Replica("c", False, False, 1, unrouted_since=NOW - 60)
    just_left = Replica("d", False, False, 0, unrouted_since=NOW - 1)
    unread = Replica("e", False, False, 0, known=False, unrouted_since=NOW - 60)
    parked = Replica("f", False, True, 0, unrouted_since=NOW - 60)
    got = plan([routed, idle, draining, just_left, unread, parked], 1, standby=True,
               hold=False, now=NOW, drain_s=DRAIN)  # fmt: skip
    assert got == Plan(park=frozenset({"b"}))


def test_more_demand_routes_resident_pods_first_then_wakes_parked_ones() -> None:
    replicas = pods(("a", True, False, 5), ("b", False, True, 0), ("c", False, False, 0))
    assert plan(replicas, 2, standby=True, hold=False, now=NOW, drain_s=DRAIN) == Plan(
        route=frozenset({"c"})
    )
    assert plan(replicas, 3, standby=True, hold=False, now=NOW, drain_s=DRAIN) == Plan(
        route=frozenset({"b", "c"}), wake=frozenset({"b"})
    )


def test_without_standby_every_pod_is_routed_and_nothing_parks() -> None:
    replicas = pods(("a", False, False, 0), ("b", True, False, 0), ("c", False, True, 0))
    assert plan(replicas, 0, standby=False, hold=False, now=NOW, drain_s=DRAIN) == Plan(
        route=frozenset({"a", "c"})
    )


def test_while_the_decision_is_held_nothing_leaves_the_rotation_or_parks() -> None:
    replicas = pods(("a", True, False, 0), ("b", True, False, 0), ("c", False, False, 0))
    assert plan(replicas, 0, standby=True, hold=True, now=NOW, drain_s=DRAIN) == Plan()
    nothing_routed = pods(("a", False, True, 0), ("b", False, False, 0))
    assert plan(nothing_routed, 0, standby=True, hold=True, now=NOW, drain_s=DRAIN) == Plan(
        route=frozenset({"b"})
    )


def test_the_pod_patch_moves_the_label_and_the_deletion_cost() -> None:
    out = pod_patch(False, 1234.5)["metadata"]
    assert out["labels"] == {wire.LABEL_ROUTED: "false"}
    assert out["annotations"] == {wire.POD_UNROUTED_AT: "1234.500", DELETION_COST: "-1"}
    back = pod_patch(True, 0.0)["metadata"]
    assert back["labels"] == {wire.LABEL_ROUTED: "true"}
    assert back["annotations"] == {wire.POD_UNROUTED_AT: None, DELETION_COST: None}


replica_sets = st.lists(
    st.builds(
        Replica,
        name=st.sampled_from("abcdefgh"),
        routed=st.booleans(),
        parked=st.booleans(),
        in_flight=st.sampled_from([0.0, 1.0, 3.0]),
        known=st.booleans(),
        unrouted_since=st.sampled_from([None, NOW - 100, NOW - 1]),
    ),
    max_size=8,
    unique_by=lambda r: r.name,
)


def after(replicas: list[Replica], change: Plan) -> list[Replica]:
    """The replicas once the plan's label moves are made (at NOW)."""
    out = []
    for r in replicas:
        if r.name in change.route:
            r = replace(r, routed=True, unrouted_since=None)
        elif r.name in change.unroute:
            r = replace(r, routed=False, unrouted_since=NOW)
        out.append(r)
    return out


actives = st.one_of(st.just(0), st.integers(0, 10))  # zero often: the scale to standby


@given(replica_sets, actives, st.booleans(), st.booleans())
def test_routing_invariants(
    replicas: list[Replica], active: int, standby: bool, hold: bool
) -> None:
    change = plan(replicas, active, standby=standby, hold=hold, now=NOW, drain_s=DRAIN)
    by_name = {r.name: r for r in replicas}
    moved = after(replicas, change)
    routed = {r.name for r in moved if r.routed}
    assert not change.route & change.unroute
    assert all(not by_name[n].routed for n in change.route)
    assert all(by_name[n].routed for n in change.unroute)
    if replicas:  # a request can always reach a replica
        assert routed
    if not standby:
        assert routed == set(by_name) and not (change.park or change.wake or change.unroute)
    elif hold:
        assert not change.unroute and not change.park
        assert routed >= {r.name for r in replicas if r.routed}
    else:
        assert len(routed) == min(len(replicas), max(1, active))
        if any(by_name[n].parked for n in routed):  # residents are preferred
            assert all(r.name in routed for r in replicas if not r.parked)
    for name in change.park:  # parks: idle, read, resident, and either out of the rotation
        r = by_name[name]  # for the drain time, or kept in it at zero active (a request wakes it)
        assert standby and not hold and r.known and not r.parked and r.in_flight == 0
        if name in routed:
            assert active == 0 and len(routed) == 1
        else:
            assert not r.routed and r.unrouted_since is not None
            assert NOW - r.unrouted_since >= DRAIN
    assert all(n in routed and by_name[n].parked for n in change.wake)
    assert len(change.wake) <= active
    if standby and not hold and active == 0:  # the decision's zero is real: nothing idle,
        for r in moved:  # read and resident stays in the rotation
            if r.routed and r.known and not r.parked and r.in_flight == 0:
                assert r.name in change.park
    # Stable: once the moves are made, the same demand moves nothing more.
    again = plan(moved, active, standby=standby, hold=hold, now=NOW, drain_s=DRAIN)
    assert not again.route and not again.unroute
