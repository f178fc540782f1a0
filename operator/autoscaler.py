"""``desired(samples, policy, state, now) -> Decision``: replicas from in-flight requests, as
Knative's KPA computes them, plus Berth's scale to standby.

KPA (knative/serving ``pkg/autoscaler/scaling/autoscaler.go``), step by step:

- demand is the average total concurrency (running + waiting requests summed over the replicas)
  over the stable window (60 s) and over the panic window (6 s);
- the target per replica is ``targetConcurrency x targetUtilization``; wanted replicas are
  ``ceil(demand / target)`` for each window, kept within ``[floor(ready / maxScaleDownRate),
  ceil(ready x maxScaleUpRate)]`` where ``ready`` is at least 1;
- panic starts when the panic window wants at least ``panicThreshold`` x the ready replicas, and
  ends once no panic-worthy demand was seen for a whole stable window; while panicking the larger
  of both windows counts and the count never goes down;
- with a scale-down delay, the count is the most wanted over the last ``delay`` seconds;
- min and max replicas bound the result.

Berth's steps: the last replica is never removed (Berth has no activator to hold requests while
no replica runs, and a request is what wakes a parked one); with standby on it parks. The
decision names how many replicas run (``replicas``, at least ``max(minReplicas, 1)``) and how
many of them should be ``active``; the rest are parked in host memory (the operator's loop takes
them out of the Service's rotation and parks them, ``routing.py``). Pods follow the stable
window, as in KPA, because a new pod costs a cold start; residency follows the panic window at
the full ``targetConcurrency`` (no utilisation headroom, no panic mode), because a wake costs a
fraction of a second: the headroom is there to carry demand while new pods cold-start. So a
replica kept only by the stable window's memory, by panic or by the scale-down delay parks and
holds no GPU memory, and comes back with a wake rather than a cold start when demand returns.
The last replica is no exception: with nothing in flight over the panic window (and
``minActiveReplicas`` 0) ``active`` is 0 and the operator parks it at once, in the Service's
rotation, rather than leaving it resident until its own ``standby.idleSeconds`` run out.
KPA's default delay is 0, which lets the count step by one around a boundary as the average
moves with noise (every few ticks under steady Poisson load, shown in the tests); a removed GPU
replica costs a cold start to bring back, so Berth's default delay is 120 s. The active count
has a delay of its own, ``active_down_delay_s`` (10 s, or the panic window if longer): it is the
most wanted over that time, so it rises at once but falls only once the lower count has held.
Without it, a panic-window average near a boundary moved a pod out of the rotation and back
within seconds (seen on the real node: 1 -> 2 -> 1 active in 4 s, the second drop taking the
other pod), and each move is an endpoint update and, past the drain, a park and a wake.

Missing or stale metrics never scale down: with no fresh sample, or a sample that could not read
every ready replica, or a stable window not yet covered by samples (the operator just started),
the count and the active count may rise but not fall, and the decision says why. Pure: no clock,
no I/O.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from berth.operator.api import InferenceServiceSpec

# Decision reasons (status ``lastDecision.reason`` and event reasons).
SCALED_UP = "ScaledUp"
SCALED_DOWN = "ScaledDown"
STEADY = "Steady"
PANIC = "Panic"
TO_STANDBY = "ScaledToStandby"
NO_METRICS = "NoMetrics"
METRICS_STALE = "MetricsStale"
METRICS_PARTIAL = "MetricsPartial"
WINDOW_FILLING = "WindowFilling"
HELD = (NO_METRICS, METRICS_STALE, METRICS_PARTIAL, WINDOW_FILLING)


@dataclass(frozen=True)
class Sample:
    """One reading of a service's replicas at ``time`` (seconds, any epoch)."""

    time: float
    concurrency: float  # in-flight requests summed over the replicas read (running + waiting)
    ready: int  # replicas ready to take requests (parked ones included: a request wakes them)
    parked: int = 0  # of the replicas read, those parked in standby
    missing: int = 0  # ready replicas whose metrics could not be read


@dataclass(frozen=True)
class Policy:
    target_concurrency: float = 8.0
    target_utilization: float = 0.7
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0
    max_scale_up_rate: float = 10.0
    max_scale_down_rate: float = 2.0
    min_replicas: int = 1
    max_replicas: int | None = None
    scale_down_delay_s: float = 120.0  # KPA's default is 0
    active_down_delay_s: float = 10.0  # a lower active count holds this long first
    standby: bool = True  # idle replicas park (hold no GPU memory) instead of staying active
    # Remove the last replica too. Only with an activator that holds requests while nothing runs
    # and reports them as demand (Knative's); Berth has none, so the operator never sets it.
    scale_to_zero: bool = False
    min_active_replicas: int = 0
    stale_after_s: float = 10.0  # a newer sample than this must exist to act on

    @property
    def target(self) -> float:
        """In-flight requests one replica should carry."""
        return self.target_concurrency * self.target_utilization

    @property
    def floor(self) -> int:
        """Fewest replicas that run: one at least, parked with standby, unless scaling to zero."""
        return max(self.min_replicas, 0 if self.scale_to_zero else 1)

    @classmethod
    def from_spec(cls, spec: InferenceServiceSpec, stale_after_s: float = 10.0) -> "Policy":
        a, s = spec.autoscaling, spec.standby
        if a is None:
            raise ValueError("the service sets no spec.autoscaling")
        standby = s is not None and s.enabled  # the runtimes can park only with spec.standby
        return cls(
            target_concurrency=a.target_concurrency,
            target_utilization=a.target_utilization,
            stable_window_s=a.stable_window_seconds,
            panic_window_s=a.panic_window_seconds,
            panic_threshold=a.panic_threshold,
            max_scale_up_rate=a.max_scale_up_rate,
            max_scale_down_rate=a.max_scale_down_rate,
            min_replicas=spec.min_replicas,
            max_replicas=spec.max_replicas,
            scale_down_delay_s=a.scale_down_delay_seconds,
            standby=standby,
            min_active_replicas=s.min_active_replicas if s is not None and standby else 0,
            stale_after_s=stale_after_s,
        )


@dataclass(frozen=True)
class State:
    """What the autoscaler remembers between decisions (KPA's panic time, max panic pods and
    delay window), next to the replica count in force."""

    replicas: int
    active: int | None = None  # None: not decided yet (all replicas count as active)
    panic_since: float | None = None  # last time the panic window was over the threshold
    max_panic_replicas: int = 0
    wanted: tuple[tuple[float, int], ...] = ()  # (time, replicas) within the scale-down delay
    resident: tuple[tuple[float, int], ...] = ()  # (time, active wanted) within its own delay
    last_seen: float | None = None  # time of the newest sample seen


@dataclass(frozen=True)
class Decision:
    replicas: int  # replicas that should run
    active: int  # of them, replicas that should stay active; the rest park
    reason: str
    message: str
    state: State

    @property
    def standby(self) -> int:
        return self.replicas - self.active

    @property
    def held(self) -> bool:
        """Metrics were missing or not yet trustworthy, so nothing went down."""
        return self.reason in HELD


def _average(samples: Sequence[Sample], since: float) -> float | None:
    inside = [s.concurrency for s in samples if s.time > since]
    return sum(inside) / len(inside) if inside else None


def desired(samples: Sequence[Sample], policy: Policy, state: State, now: float) -> Decision:
    """The replica count and active count for ``now``, from samples in time order."""
    newest = max([s.time for s in samples], default=state.last_seen)
    fresh = [s for s in samples if now - policy.stale_after_s <= s.time <= now]
    if not fresh:
        what = "no sample" if newest is None else f"the newest sample is {now - newest:.0f}s old"
        reason = NO_METRICS if newest is None else METRICS_STALE
        return _hold(policy, state, reason, f"{what}: holding {state.replicas} replica(s)")
    latest = fresh[-1]
    ready = max(1, latest.ready)
    stable = _average(samples, now - policy.stable_window_s) or 0.0
    panic = _average(samples, now - policy.panic_window_s) or 0.0
    up_limit = math.ceil(policy.max_scale_up_rate * ready)
    down_limit = math.floor(ready / policy.max_scale_down_rate)
    want_stable = math.ceil(stable / policy.target)
    want_panic = math.ceil(panic / policy.target)
    stable_count = min(max(want_stable, down_limit), up_limit)
    panic_count = min(max(want_panic, down_limit), up_limit)

    panic_since, max_panic = state.panic_since, state.max_panic_replicas
    if want_panic / ready >= policy.panic_threshold:
        panic_since = now
    elif panic_since is not None and panic_since + policy.stable_window_s < now:
        panic_since, max_panic = None, 0
    count = stable_count
    if panic_since is not None:  # never down while panicking
        count = max(count, panic_count, max_panic)
        max_panic = count

    wanted, kept = state.wanted, count
    if policy.scale_down_delay_s > 0:
        wanted = (*(w for w in wanted if w[0] > now - policy.scale_down_delay_s), (now, count))
        kept = max(n for _, n in wanted)
    replicas = _bounded(kept, policy)
    # Residency follows the panic window at the full target (a wake is cheap); the rest park.
    # Without standby, every replica stays active.
    now_count = min(math.ceil(panic / policy.target_concurrency), up_limit)
    hold_s = max(policy.active_down_delay_s, policy.panic_window_s)
    resident = (*(r for r in state.resident if r[0] > now - hold_s), (now, now_count))
    most = max(n for _, n in resident)
    active = max(min(most, replicas), min(policy.min_active_replicas, replicas))
    if not policy.standby:
        active = replicas
    demand = (
        f"{stable:.1f} in flight over {policy.stable_window_s:.0f}s, "
        f"{panic:.1f} over {policy.panic_window_s:.0f}s"
    )
    after = State(replicas, active, panic_since, max_panic, wanted, resident, newest)

    covered = samples[0].time <= now - policy.stable_window_s + policy.stale_after_s
    was_active = state.replicas if state.active is None else state.active
    going_down = replicas < state.replicas or active < was_active
    if going_down and (latest.missing or not covered):
        if latest.missing:
            reason, why = METRICS_PARTIAL, f"metrics of {latest.missing} ready replica(s) missing"
        else:
            reason = WINDOW_FILLING
            why = f"samples do not cover the {policy.stable_window_s:.0f}s window yet"
        held = replace(after, replicas=state.replicas, active=state.active)
        return _hold(policy, held, reason, f"{why}: not scaling below {state.replicas} ({demand})")

    if panic_since is not None:
        reason = PANIC
    elif replicas > state.replicas:
        reason = SCALED_UP
    elif replicas < state.replicas:
        reason = SCALED_DOWN
    elif active == 0 and policy.standby:
        reason = TO_STANDBY
    else:
        reason = STEADY
    message = f"{demand}; target {policy.target:.2f} per replica -> {replicas} replica(s)"
    if active < replicas:
        message += f", {replicas - active} of them in standby"
    if latest.parked:
        message += f" ({latest.parked} parked now)"
    return Decision(replicas, active, reason, message, after)


def _bounded(count: int, policy: Policy) -> int:
    count = max(count, policy.floor)
    return count if policy.max_replicas is None else min(count, policy.max_replicas)


def _hold(policy: Policy, state: State, reason: str, message: str) -> Decision:
    """Keep the replicas in force (within the bounds, which may have changed) and their split."""
    replicas = _bounded(state.replicas, policy)
    active = replicas if state.active is None else min(max(state.active, 0), replicas)
    return Decision(
        replicas, active, reason, message, replace(state, replicas=replicas, active=active)
    )
