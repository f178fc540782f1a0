"""``plan(replicas, active, ...) -> Plan``: which of a service's pods take requests, which park
and which wake, so that the autoscaler's active/standby split is real.

A plain Kubernetes Service spreads requests over every Ready pod, so a parked replica would be
woken by the next request that happens to reach it, and under any load none would stay parked.
The rendered Service therefore selects only pods labelled ``berth.dev/routed=true`` (pods are
born with it), and the autoscaler's loop moves the label each tick:

- the routed set has the decision's ``active`` pods, and at least one: a request must always
  reach a replica, and a request is what wakes a parked one (Berth has no activator);
- it prefers pods that are resident (routing a parked one costs its first request a wake), then
  pods already routed (no churn), then the busiest;
- a pod out of rotation for ``drain_s`` (long enough for kube-proxy to stop sending it new
  connections) with nothing in flight is parked by the loop; its own idle timeout
  (``standby.idleSeconds``) would park it too, later;
- when the decision wants no replica active (nothing was in flight over the panic window, and
  ``minActiveReplicas`` is 0), the pod kept in the rotation only so that a request can reach
  it parks too once it has nothing in flight: it stays routed, and the next request wakes it
  (a wake is a fraction of a second). Waiting for its idle timeout instead would keep a GPU
  share for ``idleSeconds`` (300 s by default) after every burst of demand, with the decision
  and the status saying that no replica is active;
- a parked pod that the decision wants active (not just the one kept for routing) is woken, so
  that it is resident before the requests come;
- while the decision is held on missing metrics, nothing leaves the rotation.

Unrouted pods also carry a negative ``controller.kubernetes.io/pod-deletion-cost``, so a
scale-down removes them before a routed pod: the count never drops below the active count, so
the pods a scale-down removes are all unrouted ones. Pure: no clock, no I/O.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from berth import wire

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
UNROUTED_DELETION_COST = "-1"  # ReplicaSets remove pods of lower cost first (default 0)


@dataclass(frozen=True)
class Replica:
    """A ready pod of the service as the loop sees it this tick."""

    name: str
    routed: bool  # its label puts it in the Service's endpoints
    parked: bool  # parking or in standby (holds no GPU memory)
    in_flight: float  # running + waiting requests
    known: bool = True  # its metrics were read this tick (else it is never parked)
    unrouted_since: float | None = None  # when it left the rotation (seconds); None if routed


@dataclass(frozen=True)
class Plan:
    route: frozenset[str] = frozenset()  # pods to put into the rotation
    unroute: frozenset[str] = frozenset()  # pods to take out of it
    park: frozenset[str] = frozenset()  # out of it long enough, idle and still resident
    wake: frozenset[str] = frozenset()  # parked but wanted active


def plan(
    replicas: Sequence[Replica],
    active: int,
    *,
    standby: bool,
    hold: bool,
    now: float,
    drain_s: float,
) -> Plan:
    """The changes that make the routed set the decision's ``active`` pods (every pod without
    standby; only additions while ``hold``), and the parks and wakes that follow."""
    if not replicas:
        return Plan()
    order = sorted(replicas, key=lambda r: (r.parked, not r.routed, -r.in_flight, r.name))
    if not standby:
        chosen = list(order)
    elif hold:
        chosen = [r for r in order if r.routed] or order[:1]
    else:
        chosen = order[: max(1, active)]
    routed = {r.name for r in chosen}
    route = frozenset(r.name for r in chosen if not r.routed)
    unroute = frozenset(r.name for r in replicas if r.routed and r.name not in routed)
    if not standby:
        return Plan(route=route)
    wake = frozenset(r.name for r in order[:active] if r.parked and r.name in routed)
    if hold:
        return Plan(route=route, unroute=unroute, wake=wake)

    def drained(r: Replica) -> bool:  # out of the rotation long enough for kube-proxy
        return (
            not r.routed
            and r.name not in routed
            and r.unrouted_since is not None
            and now - r.unrouted_since >= drain_s
        )

    def kept_only_to_route(r: Replica) -> bool:  # in it only so that a request can wake it
        return active == 0 and r.name in routed

    park = frozenset(
        r.name
        for r in replicas
        if r.known and not r.parked and r.in_flight == 0 and (drained(r) or kept_only_to_route(r))
    )
    return Plan(route=route, unroute=unroute, park=park, wake=wake)


def pod_patch(routed: bool, now: float) -> dict[str, Any]:
    """The merge patch that puts a pod into the rotation or takes it out at ``now``."""
    annotations: dict[str, str | None] = {wire.POD_UNROUTED_AT: None, DELETION_COST: None}
    if not routed:
        annotations = {wire.POD_UNROUTED_AT: f"{now:.3f}", DELETION_COST: UNROUTED_DELETION_COST}
    label = "true" if routed else "false"
    return {"metadata": {"labels": {wire.LABEL_ROUTED: label}, "annotations": annotations}}
