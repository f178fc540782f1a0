"""The pure autoscaler, driven by load traces: step, spike, ramp, diurnal and bursty loads.

``simulate`` plays a trace through ``desired`` every 2 s (KPA's tick) with a window of samples,
as the operator's loop does; a scaled-up replica turns ready only after ``ready_after_s``.
"""

import itertools
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from berth.operator import api, autoscaler
from berth.operator.autoscaler import Decision, Policy, Sample, State, desired

TICK = 2.0
# Knative's KPA defaults (no scale-down delay), 7 in flight per replica; Berth's defaults beside.
POLICY = Policy(target_concurrency=10, max_replicas=50, scale_down_delay_s=0)
BERTH = Policy(target_concurrency=10, max_replicas=50)


@dataclass
class Run:
    times: list[float]
    decisions: list[Decision]
    ready: list[int]

    @property
    def replicas(self) -> list[int]:
        return [d.replicas for d in self.decisions]

    def at(self, t: float) -> Decision:
        return self.decisions[self.times.index(t)]

    def changes(self, since: float = 0.0) -> int:
        counts = [d.replicas for t, d in zip(self.times, self.decisions, strict=True) if t >= since]
        return sum(a != b for a, b in itertools.pairwise(counts))

    def first(self, predicate: Callable[[Decision], bool]) -> float:
        return next(t for t, d in zip(self.times, self.decisions, strict=True) if predicate(d))


def simulate(
    trace: Callable[[float], float],
    policy: Policy = POLICY,
    duration_s: float = 600.0,
    start: int = 1,
    ready_after_s: float = 0.0,
    observe: Callable[[float], bool] = lambda t: True,
) -> Run:
    """Decide every tick; ``observe(t)`` False means that tick's metrics could not be read."""
    samples: deque[Sample] = deque()
    state = State(start)
    decided: list[tuple[float, int]] = [(-1e9, start)]
    run = Run([], [], [])
    t = 0.0
    while t <= duration_s:
        settled = [n for when, n in decided if when <= t - ready_after_s][-1]
        ready = min(state.replicas, settled)
        if observe(t):
            parked = state.replicas - (state.active if state.active is not None else ready)
            samples.append(Sample(t, trace(t), ready, parked=max(parked, 0)))
        while samples and samples[0].time <= t - policy.stable_window_s:
            samples.popleft()
        decision = desired(list(samples), policy, state, t)
        if decision.replicas != state.replicas:
            decided.append((t, decision.replicas))
        state = decision.state
        run.times.append(t)
        run.decisions.append(decision)
        run.ready.append(ready)
        t += TICK
    return run


def needed(concurrency: float, policy: Policy = POLICY) -> int:
    return math.ceil(concurrency / policy.target)


def resident(concurrency: float, policy: Policy = POLICY) -> int:
    """Replicas kept active: a wake is cheap, so residency packs to the full target."""
    return math.ceil(concurrency / policy.target_concurrency)


def assert_rates_bounded(run: Run, policy: Policy = POLICY) -> None:
    """Every step stays within KPA's rates of the replicas ready at that tick, and the bounds."""
    previous = run.decisions[0].replicas
    for decision, ready in zip(run.decisions[1:], run.ready[1:], strict=True):
        ready = max(ready, 1)
        if decision.replicas > previous:
            assert decision.replicas <= max(
                math.ceil(policy.max_scale_up_rate * ready), policy.floor
            )
        if decision.replicas < previous:
            assert decision.replicas >= math.floor(ready / policy.max_scale_down_rate)
        assert policy.floor <= decision.replicas <= (policy.max_replicas or 10**9)
        assert 0 <= decision.active <= decision.replicas
        previous = decision.replicas


# ---- defaults and the spec -------------------------------------------------------------------


def test_the_policy_from_a_spec_has_knatives_defaults() -> None:
    spec = api.InferenceServiceSpec.model_validate(
        {"model": {"source": {"hostPath": {"path": "/m"}}}, "gpu": {"fraction": 0.5},
         "autoscaling": {}, "maxReplicas": 4}
    )  # fmt: skip
    policy = Policy.from_spec(spec)
    assert (policy.stable_window_s, policy.panic_window_s, policy.panic_threshold) == (60, 6, 2.0)
    assert policy.target_utilization == 0.7 and policy.target == pytest.approx(5.6)
    assert (policy.min_replicas, policy.max_replicas, policy.standby) == (1, 4, False)
    with_standby = spec.model_copy(update={"standby": api.StandbySpec()})
    assert Policy.from_spec(with_standby).standby  # only runtimes told to may park
    assert policy.scale_down_delay_s == 120 == BERTH.scale_down_delay_s


# ---- traces ----------------------------------------------------------------------------------


def test_a_step_is_met_through_the_panic_window_within_a_few_seconds() -> None:
    run = simulate(lambda t: 70.0 if t >= 100 else 3.0, duration_s=300)
    reached = run.first(lambda d: d.replicas >= needed(70))
    assert reached - 100 <= 6.0  # the 6 s panic window sees it first
    assert run.at(reached).reason == autoscaler.PANIC
    assert max(run.replicas) <= needed(70)  # never more than the demand asks for
    assert_rates_bounded(run)


def test_a_spike_scales_up_at_once_and_down_only_after_the_stable_window() -> None:
    run = simulate(lambda t: 140.0 if 100 <= t < 110 else 3.0, duration_s=600)
    peak = run.first(lambda d: d.replicas == max(run.replicas))
    assert peak - 100 <= 6.0
    down = run.first(lambda d: d.reason == autoscaler.SCALED_DOWN)
    # Panic holds the count until a whole stable window passed since demand last crossed the
    # threshold (the first seconds of the spike, while few replicas were ready).
    assert down >= 100 + POLICY.stable_window_s
    for t, d in zip(run.times, run.decisions, strict=True):
        if d.reason == autoscaler.PANIC and t > peak:
            assert d.replicas == max(run.replicas)  # no scale-down while panicking
    assert run.replicas[-1] == needed(3)
    assert_rates_bounded(run)


def test_a_ramp_is_tracked_without_ever_scaling_down() -> None:
    run = simulate(lambda t: 0.2 * t, duration_s=600, ready_after_s=10)  # to 120 in flight
    assert all(b >= a for a, b in zip(run.replicas, run.replicas[1:], strict=False))
    assert run.replicas[-1] >= needed(0.2 * (600 - 60))  # at most a stable window behind
    assert_rates_bounded(run)


def test_a_diurnal_load_scales_up_and_down_once_per_cycle_without_flapping() -> None:
    period = 1200.0

    def diurnal(t: float) -> float:
        return 40.0 + 35.0 * math.sin(2 * math.pi * t / period)

    run = simulate(diurnal, BERTH, duration_s=2 * period, ready_after_s=10)
    directions: list[bool] = []
    for a, b in zip(run.replicas, run.replicas[1:], strict=False):
        if a != b and (not directions or directions[-1] != (b > a)):
            directions.append(b > a)
    assert len(directions) <= 5  # up, down, up, down (+ the first rise from one replica)
    assert max(run.replicas) >= needed(70) and min(run.replicas[300:]) <= needed(10)
    assert_rates_bounded(run, BERTH)


def bursty(seed: int, base: float, burst: float) -> Callable[[float], float]:
    """Poisson arrivals at ``base`` in flight, with bursts of ``burst`` for 20 s every ~5 min."""
    rng = random.Random(seed)
    starts = {int(s) for s in (rng.uniform(0, 3600) for _ in range(12))}
    cache: dict[float, float] = {}

    def load(t: float) -> float:
        if t not in cache:
            in_burst = any(s <= t < s + 20 for s in starts)
            cache[t] = _poisson(rng, base + (burst if in_burst else 0.0))
        return cache[t]

    return load


def _poisson(rng: random.Random, mean: float) -> float:
    if mean > 30:  # normal approximation
        return max(0.0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return float(k)
        k += 1


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    base=st.floats(0, 60),
    burst=st.floats(0, 300),
    ready_after_s=st.sampled_from([0.0, 10.0, 30.0]),
)
def test_bursty_loads_keep_rates_bounds_and_no_scale_down_in_panic(
    seed: int, base: float, burst: float, ready_after_s: float
) -> None:
    run = simulate(bursty(seed, base, burst), duration_s=1800, ready_after_s=ready_after_s)
    assert_rates_bounded(run)
    for a, b in zip(run.decisions, run.decisions[1:], strict=False):
        if b.reason == autoscaler.PANIC:
            assert b.replicas >= a.replicas


@pytest.mark.parametrize("mean", [30.0, 90.0, 200.0])
def test_steady_poisson_noise_does_not_flap(mean: float) -> None:
    run = simulate(bursty(7, mean, 0.0), BERTH, duration_s=1800, start=needed(mean))
    # At most one step per stable window plus delay (3 min) over 28 minutes, not one every few
    # ticks as with KPA's defaults below.
    assert run.changes(since=120) <= (1800 - 120) // (60 + 120)
    assert abs(run.replicas[-1] - needed(mean)) <= max(2, needed(mean) // 4)


def test_kpa_without_a_delay_steps_by_one_with_the_noise() -> None:
    """Why Berth's default has a scale-down delay: the same load, KPA's defaults."""
    run = simulate(bursty(7, 90.0, 0.0), POLICY, duration_s=1800, start=needed(90.0))
    assert run.changes(since=120) > 30


# ---- scale to standby ------------------------------------------------------------------------


def test_idle_replicas_park_instead_of_going_away_and_come_back_under_load() -> None:
    run = simulate(lambda t: 30.0 if t < 200 or t >= 600 else 0.0, BERTH, duration_s=900, start=6)
    waiting = run.at(300)  # the delay keeps replicas that demand no longer needs: they park
    assert waiting.replicas == needed(30) and waiting.active < waiting.replicas
    idle = run.at(580)
    assert (idle.replicas, idle.active, idle.standby) == (1, 0, 1)
    assert idle.reason == autoscaler.TO_STANDBY
    back = run.at(606)
    assert back.replicas >= needed(30)  # the panic window sees the return
    assert back.active == resident(30) < needed(30)
    assert_rates_bounded(run, BERTH)


def test_residency_follows_the_panic_window_while_pods_follow_the_stable_one() -> None:
    """A wake costs a fraction of a second, a new pod a cold start: when demand drops, replicas
    park within seconds but stay for the stable window and the delay."""
    run = simulate(lambda t: 70.0 if t < 300 else 7.0, BERTH, duration_s=400, start=needed(70))
    after = run.at(320)
    assert after.replicas == needed(70) and after.active == resident(7) == 1
    assert after.reason == autoscaler.STEADY and "9 of them in standby" in after.message


def test_residency_packs_to_the_full_target_while_pods_keep_the_utilisation_headroom() -> None:
    """Pods are sized at 70 % of the target (a new one is a cold start away); replicas are kept
    resident at 100 % (a parked one is a wake away), even while panicking."""
    run = simulate(lambda t: 45.0, BERTH, duration_s=200, start=1)
    last = run.decisions[-1]
    assert last.replicas == needed(45) == 7 and last.active == resident(45) == 5


def shortest_stay(run: Run) -> float:
    """The shortest time from a rise of the active count to its next fall."""
    stays, risen = [], None
    for t, (a, b) in zip(run.times[1:], itertools.pairwise(run.decisions), strict=True):
        if b.active > a.active:
            risen = t
        elif b.active < a.active and risen is not None:
            stays.append(t - risen)
            risen = None
    return min(stays)


def test_a_lower_active_count_must_hold_before_a_pod_leaves_the_rotation() -> None:
    """The real node's case: one client near a target of one, over a 2 s panic window, with a
    request now and then overlapping the next. Without the delay a pod left the rotation, came
    back and left again within seconds (1 -> 2 -> 1 active in 4 s); with it, the count rises at
    once and falls only after 10 s without a higher count, and changes less often."""
    rng = random.Random(3)
    noise = {2.0 * i: 1.0 + (rng.random() < 0.2) for i in range(200)}
    policy = Policy(target_concurrency=1, target_utilization=1.0, stable_window_s=6,
                    panic_window_s=2, scale_down_delay_s=20, max_replicas=2)  # fmt: skip
    flapping = simulate(noise.__getitem__, replace(policy, active_down_delay_s=0), 390, start=2)
    held = simulate(noise.__getitem__, policy, 390, start=2)
    assert shortest_stay(flapping) == TICK and shortest_stay(held) >= 10
    changes = [sum(a.active != b.active for a, b in itertools.pairwise(run.decisions))
               for run in (flapping, held)]  # fmt: skip
    assert changes[0] > 1.5 * changes[1] > 0


@settings(max_examples=80, deadline=None)
@given(
    values=st.lists(st.floats(0, 60), min_size=1, max_size=80),
    target=st.sampled_from([1.0, 4.0, 10.0]),
    panic_window=st.sampled_from([2.0, 6.0, 20.0]),
    delay=st.sampled_from([0.0, 4.0, 10.0, 30.0]),
    min_active=st.integers(0, 2),
)
def test_an_active_count_once_reached_holds_for_the_delay(
    values: list[float], target: float, panic_window: float, delay: float, min_active: int
) -> None:
    """Whatever the load: the active count that the panic window asks for at t is met at once
    and kept (within the replicas running) until t + max(delay, panic window)."""
    policy = Policy(target_concurrency=target, panic_window_s=panic_window, max_replicas=20,
                    active_down_delay_s=delay, min_active_replicas=min_active)  # fmt: skip
    run = simulate(lambda t: values[int(t / TICK) % len(values)], policy, 2 * TICK * len(values))
    hold = max(delay, panic_window)
    for t, d in zip(run.times, run.decisions, strict=True):
        assert min(min_active, d.replicas) <= d.active <= d.replicas
        if d.held:  # the old count, kept on trust
            continue
        asked = d.state.resident[-1][1]  # what the panic window asks for at t
        for u, later in zip(run.times, run.decisions, strict=True):
            if t <= u < t + hold:
                assert later.active >= min(asked, later.replicas)


def test_min_active_replicas_never_park() -> None:
    policy = Policy(target_concurrency=10, min_replicas=3, min_active_replicas=2)
    run = simulate(lambda t: 0.0, policy, duration_s=200, start=3)
    assert (run.decisions[-1].replicas, run.decisions[-1].active) == (3, 2)


def test_without_standby_kpa_scales_to_zero() -> None:
    policy = Policy(target_concurrency=10, min_replicas=0, standby=False, scale_to_zero=True)
    run = simulate(lambda t: 20.0 if t < 100 else 0.0, policy, duration_s=400, start=4)
    assert run.decisions[-1].replicas == 0 == run.decisions[-1].active


def test_without_standby_the_last_replica_stays_active() -> None:
    """No activator holds requests while nothing runs, so Berth keeps one replica; without
    standby it stays active."""
    policy = Policy(target_concurrency=10, min_replicas=0, standby=False)
    run = simulate(lambda t: 20.0 if t < 100 else 0.0, policy, duration_s=600, start=4)
    assert (run.decisions[-1].replicas, run.decisions[-1].active) == (1, 1)


def test_a_scale_down_delay_keeps_the_most_replicas_wanted_over_the_delay() -> None:
    delayed = Policy(target_concurrency=10, scale_down_delay_s=300)
    run = simulate(lambda t: 60.0 if t < 100 else 3.0, delayed, duration_s=600)
    plain = simulate(lambda t: 60.0 if t < 100 else 3.0, duration_s=600)
    assert plain.first(lambda d: d.replicas == 1) < 300
    peak = needed(60)
    assert run.first(lambda d: d.replicas < peak) >= 100 + 300
    assert any(d.standby > 0 for d in run.decisions)  # meanwhile the surplus parks
    assert_rates_bounded(run, delayed)


# ---- missing and stale metrics never scale down ----------------------------------------------


def test_metrics_that_stop_hold_the_count_and_say_why() -> None:
    run = simulate(lambda t: 40.0 if t < 100 else 0.0, observe=lambda t: t < 100, duration_s=400)
    before = run.at(98).replicas
    assert before == needed(40)
    assert all(d.replicas == before for d in run.decisions[50:])
    assert run.decisions[-1].reason == autoscaler.METRICS_STALE and run.decisions[-1].held
    assert "the newest sample is 302s old" in run.decisions[-1].message


def test_no_samples_at_all_hold() -> None:
    decision = desired([], POLICY, State(4, active=3), now=1000.0)
    assert (decision.replicas, decision.active, decision.reason) == (4, 3, autoscaler.NO_METRICS)


def test_a_replica_that_cannot_be_read_blocks_scale_down_but_not_scale_up() -> None:
    state = State(6)
    quiet = [Sample(t, 0.0, ready=6, missing=1) for t in range(0, 122, 2)]
    held = desired(quiet, POLICY, state, now=120.0)
    assert (held.replicas, held.reason) == (6, autoscaler.METRICS_PARTIAL)
    busy = [Sample(t, 200.0, ready=6, missing=1) for t in range(0, 122, 2)]
    assert desired(busy, POLICY, state, now=120.0).replicas == needed(200)


def test_an_unreadable_last_replica_is_not_reported_idle() -> None:
    quiet = [Sample(t, 0.0, ready=1, missing=1) for t in range(0, 122, 2)]
    decision = desired(quiet, POLICY, State(1, active=1), now=120.0)
    assert (decision.replicas, decision.active, decision.reason) == (
        1,
        1,
        autoscaler.METRICS_PARTIAL,
    )


def test_a_window_not_yet_covered_after_a_restart_does_not_scale_down() -> None:
    recent = [Sample(t, 0.0, ready=5) for t in range(100, 122, 2)]
    decision = desired(recent, POLICY, State(5), now=120.0)
    assert (decision.replicas, decision.reason) == (5, autoscaler.WINDOW_FILLING)
    covered = [Sample(t, 0.0, ready=5) for t in range(58, 122, 2)]
    assert desired(covered, POLICY, State(5), now=120.0).replicas < 5


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(0, 500), max_size=40),
    gap=st.floats(0, 120),
    replicas=st.integers(0, 60),
    missing=st.integers(0, 3),
    min_replicas=st.integers(0, 5),
    standby=st.booleans(),
    to_zero=st.booleans(),
)
def test_any_samples_give_a_count_within_bounds_and_holds_never_go_down(
    values: list[float],
    gap: float,
    replicas: int,
    missing: int,
    min_replicas: int,
    standby: bool,
    to_zero: bool,
) -> None:
    policy = Policy(
        min_replicas=min_replicas, max_replicas=50, standby=standby, scale_to_zero=to_zero
    )
    now = 2.0 * len(values) + gap
    samples = [Sample(2.0 * i, v, ready=replicas, missing=missing) for i, v in enumerate(values)]
    decision = desired(samples, policy, State(replicas), now)
    assert policy.floor <= decision.replicas <= 50
    assert 0 <= decision.active <= decision.replicas
    assert decision.state.replicas == decision.replicas
    if decision.held or missing:
        assert decision.replicas >= min(replicas, 50)
