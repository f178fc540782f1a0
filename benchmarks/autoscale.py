"""Autoscaling policies on a simulated day: Berth (scale to standby) against Knative's KPA (scale
to zero, cold starts) and a fixed replica count, then a 1 to 16 replica ramp.

    python benchmarks/autoscale.py [--cold-start-s 46.5] [--wake-s 0.335] [--seed 1]

Every policy runs the same pure decision, ``berth.operator.autoscaler.desired``, every 2 s on
the same request trace; only the policy differs:

- **Berth**: Berth's defaults (standby on, minReplicas 1, 120 s scale-down delay whose surplus
  parks), runtimes parking after ``--idle-park-s`` without requests; a parked replica holds no
  GPU memory and wakes in ``--wake-s`` on the request that reaches it. More rows change one
  setting each: a 30-minute scale-down delay (parked replicas cost no GPU, so keeping them
  longer trades host memory for cold starts), and a standby pool (minReplicas = the fixed
  count, all parked while idle), the pool also with the CRD's default ``idleSeconds`` (300 s).
- **KPA**: Knative's defaults (stable 60 s, panic 6 s at 200 %, 70 % utilisation, rates 10 and
  2, no scale-down delay, scale to zero after a 30 s grace period); a new replica is a cold start
  (``--cold-start-s``), during which it holds its GPU but serves nothing.
- **Fixed**: enough replicas for the peak demand (base peak + burst at the utilisation target),
  always on.

The simulation is request level and event driven. Calibration, all from recorded results:
TTFT by concurrency (p50 / p90 at 1, 16 and 64 streams) and inter-token latency (p50) from
``benchmarks/results/serve-h100.md`` (llama-3-8b, 512 prompt + 256 output tokens, H100); a
replica serves at most 64 streams (the highest measured level); a request's TTFT is drawn from
the measured quantiles at the replica's concurrency, plus its time in a queue, a wake or a cold
start. The wake (0.335 s), the park (0.2 s) and the cold start (46.5 s: a new process, imports,
CUDA start-up, 16 GB of weights from local disk with the page cache dropped, first token) are
Berth's own, measured on the H200 (``benchmarks/results/standby-h200.md``); a pod's cold start
adds image pull, scheduling and container start, so 46.5 s is its floor, and 15 s and 90 s are
sensitivity rows.

Routing, as the operator does it: each tick the loop's ``routing.plan`` (the same code) keeps the
decision's active replicas (at least one) in the Service's rotation, takes the rest out, parks
those idle for ``DRAIN_S`` (and, when the decision wants none active, the idle one kept in the
rotation) and wakes parked ones the decision wants active; a request goes to the least-loaded
routed Ready replica (kube-proxy spreads at random: least-loaded is the kinder model), and a
routed replica that is parked wakes on it. A scale-down removes unrouted pods first (their
deletion cost is lower). Parks are the runtime's (``runtime/server/engine_core.py``): a
parking replica holds its GPU share for ``--park-s``; a request gives up a park by the idle
timeout, and waits out one the operator asked for, then the wake.

Prints one table per scenario and writes benchmarks/results/autoscale.md.
"""

import argparse
import bisect
import heapq
import itertools
import math
import platform
import random
import textwrap
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from berth.operator import routing
from berth.operator.api import StandbySpec
from berth.operator.autoscale_loop import DRAIN_S
from berth.operator.autoscaler import Policy, Sample, State, desired

ROOT = Path(__file__).resolve().parent.parent
TICK_S = 2.0
DAY_S = 86_400.0
NIGHT_ENDS, NIGHT_STARTS = 7 * 3600.0, 22 * 3600.0
SLO_S = 1.0
IDLE_GAP_S = 300.0  # a request this long after the previous one arrives "after idle"
AFTER_IDLE_S = 30.0  # and so do those within this long after it

# benchmarks/results/serve-h100.md (2026-11-22): streams -> TTFT p50, p90 (s), ITL p50 (s).
SERVE_H100 = {1: (0.0370, 0.0418, 0.00708), 16: (0.1492, 0.1853, 0.00836),
              64: (0.2092, 0.4792, 0.01254)}  # fmt: skip
P99_OVER_P90 = 0.8216 / 0.4792  # the 64-stream level's tail; see _ttft_quantiles
OUTPUT_TOKENS = 256
SLOTS = 64  # streams per replica (the highest measured level)
TARGET_CONCURRENCY = 32.0  # per replica, before the 70 % utilisation: both autoscalers
KPA_GRACE_S = 30.0  # Knative's scale-to-zero-grace-period
CRD_IDLE_S = float(StandbySpec().idle_seconds)  # spec.standby.idleSeconds when unset
_names = itertools.count()


# ---- calibration ---------------------------------------------------------------------------


def _level(n: int) -> tuple[float, float, float, float]:
    """(p50, p90, p99, itl) at ``n`` streams: linear in log2(n) between measured levels. The
    recorded 16-stream p99 (1.60 s, from 96 requests) is one slow request, above the 64-stream
    p99 (0.82 s); the tail is taken as p90 x the 64-stream p99/p90 instead."""
    levels = sorted(SERVE_H100)
    n = min(max(n, levels[0]), levels[-1])
    i = max(1, bisect.bisect_left(levels, n))
    lo, hi = levels[i - 1], levels[i]
    w = 0.0 if hi == lo else (math.log2(n) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
    p50, p90, itl = (a + w * (b - a) for a, b in zip(SERVE_H100[lo], SERVE_H100[hi], strict=True))
    return p50, p90, p90 * P99_OVER_P90, itl


def _ttft(n: int, u: float) -> float:
    """A TTFT draw at quantile ``u``: piecewise linear through (0, 0.6 p50), (0.5, p50),
    (0.9, p90), (0.99, p99), (1, 1.25 p99)."""
    p50, p90, p99, _ = _level(n)
    points = [(0.0, 0.6 * p50), (0.5, p50), (0.9, p90), (0.99, p99), (1.0, 1.25 * p99)]
    for (u0, v0), (u1, v1) in itertools.pairwise(points):
        if u <= u1:
            return v0 + (u - u0) / (u1 - u0) * (v1 - v0)
    return points[-1][1]


# ---- traces --------------------------------------------------------------------------------


def day_trace(seed: int, base_peak: float, burst_rate: float) -> list[float]:
    """Arrival times over one day: sparse at night (one request per 10 minutes on average),
    a daytime base rising to ``base_peak`` req/s at 14:00, idle gaps of 5-20 minutes (about one
    an hour) and bursts of ``burst_rate`` extra req/s for 1-4 minutes (about two an hour)."""
    rng = random.Random(seed)
    day_start, day_end = NIGHT_ENDS, NIGHT_STARTS
    gaps, bursts = [], []
    t = day_start
    while t < day_end:
        t += rng.expovariate(1 / 3600)
        gaps.append((t, t + rng.uniform(300, 1200)))
    t = day_start
    while t < day_end:
        t += rng.expovariate(1 / 1800)
        bursts.append((t, t + rng.uniform(60, 240)))

    def rate(t: float) -> float:
        if not day_start <= t < day_end:
            return 1 / 600
        if any(a <= t < b for a, b in gaps):
            return 0.0
        shape = math.sin(math.pi * (t - day_start) / (day_end - day_start))
        extra = burst_rate if any(a <= t < b for a, b in bursts) else 0.0
        return base_peak * shape + extra

    peak = base_peak + burst_rate
    arrivals: list[float] = []
    t = 0.0
    while True:  # thinning of a Poisson process at the peak rate
        t += rng.expovariate(peak)
        if t >= DAY_S:
            return arrivals
        if rng.random() < rate(t) / peak:
            arrivals.append(t)


def ramp_trace(
    seed: int, start_rate: float, end_rate: float, ramp_s: float, hold_s: float
) -> list[float]:
    rng = random.Random(seed)
    arrivals: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(end_rate)
        if t >= ramp_s + hold_s:
            return arrivals
        rate = start_rate + (end_rate - start_rate) * min(1.0, t / ramp_s)
        if rng.random() < rate / end_rate:
            arrivals.append(t)


# ---- the simulation ------------------------------------------------------------------------


@dataclass
class Replica:
    state: str  # starting (cold) | waking | active | parking | parked | draining
    ready_at: float = 0.0
    in_flight: int = 0
    idle_since: float = 0.0
    routed: bool = True  # in the Service's endpoints (pods are born routed)
    unrouted_since: float | None = None
    parks: int = 0  # parks begun, so that a given-up park's end is ignored
    parked_at: float = 0.0  # when the park under way ends
    idle_park: bool = False  # this park is the runtime's idle timeout (a request gives it up)
    wake_after_park: bool = False  # requests wait for the park to end, then for a wake
    name: str = field(default_factory=lambda: f"r{next(_names)}")

    @property
    def holds_gpu(self) -> bool:
        return self.state != "parked"


@dataclass
class Setup:
    name: str
    policy: Policy
    cold_start_s: float
    wake_s: float = 0.0
    park_s: float = 0.0  # resident -> parked; the GPU share is held until it ends
    idle_park_s: float | None = None  # the runtime parks after this long without requests
    fixed: int | None = None  # no autoscaler: this many replicas, always active
    start_replicas: int = 1
    grace_s: float = 0.0  # KPA: the last replica goes only after this long at zero


@dataclass
class Outcome:
    ttft: list[tuple[float, float]] = field(default_factory=list)  # (arrival, ttft)
    gpu_by: dict[str, float] = field(default_factory=dict)  # seconds per use (see _use)
    gpu_night_s: float = 0.0  # of them, between 22:00 and 07:00 (the sparse night traffic)
    busy_s: float = 0.0  # time with at least one request in flight or queued
    cold_starts: int = 0
    wakes: int = 0
    most_replicas: int = 0

    @property
    def gpu_s(self) -> float:
        return sum(self.gpu_by.values())


USES = ("serving", "idle, routed", "idle, unrouted", "cold start", "waking", "parking")


def _use(r: Replica) -> str:
    """What a replica that holds its GPU share spends it on."""
    if r.state == "starting":
        return "cold start"
    if r.state == "waking":
        return "waking"
    if r.state == "parking":
        return "parking"
    if r.in_flight:
        return "serving"
    return "idle, routed" if r.routed else "idle, unrouted"


def simulate(arrivals: list[float], setup: Setup, seed: int, until: float) -> Outcome:
    rng = random.Random(seed)
    out = Outcome()
    count = setup.fixed or setup.start_replicas
    out.most_replicas = count
    replicas = [Replica("active") for _ in range(count)]
    if setup.idle_park_s is not None:
        for r in replicas:  # a standby pool starts parked
            r.state = "parked"
    queue: deque[float] = deque()  # arrival times waiting for a slot
    events: list[tuple[float, int, str, object]] = []
    seq = 0

    def push(t: float, kind: str, what: object) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, what))

    def start(r: Replica, arrival: float, t: float) -> None:
        r.in_flight += 1
        _, _, _, itl = _level(r.in_flight)
        first = _ttft(r.in_flight, rng.random())
        out.ttft.append((arrival, t - arrival + first))
        push(t + first + OUTPUT_TOKENS * itl, "done", r)

    def wake(r: Replica, t: float) -> None:
        r.state, r.ready_at = "waking", t + setup.wake_s
        out.wakes += 1
        push(r.ready_at, "ready", r)

    def park(r: Replica, t: float, idle: bool) -> None:
        """The runtime's park (``engine_core.py``): the GPU share is held for ``park_s``."""
        r.state, r.parks, r.idle_park, r.wake_after_park = "parking", r.parks + 1, idle, False
        r.parked_at = t + setup.park_s
        push(r.parked_at, "parked", (r, r.parks))

    def dispatch(arrival: float, t: float) -> bool:
        """To the least-loaded routed replica that is Ready (a parked one is: it wakes). A
        request gives up a park by the idle timeout; one asked by the operator finishes first,
        then the runtime wakes for the requests that wait (``engine_core.py``)."""
        ready = ("active", "waking", "parking", "parked")
        open_ = [r for r in replicas if r.routed and r.state in ready and r.in_flight < SLOTS]
        rank = {"active": 0, "waking": 1, "parked": 2, "parking": 3}
        best = min(open_, key=lambda r: (r.in_flight, rank[r.state]), default=None)
        if best is None:
            return False
        if best.state == "parked":
            wake(best, t)
        elif best.state == "parking" and best.idle_park:
            best.state = "active"  # given up: still resident
        elif best.state == "parking" and not best.wake_after_park:
            best.wake_after_park, best.ready_at = True, best.parked_at + setup.wake_s
        start(best, arrival, max(t, best.ready_at))
        return True

    samples: deque[Sample] = deque()
    state = State(count)
    zero_since: float | None = None
    arrival_i, last_t, t = 0, 0.0, 0.0
    push(0.0, "tick", None)
    while True:
        next_arrival = arrivals[arrival_i] if arrival_i < len(arrivals) else math.inf
        if events and events[0][0] <= next_arrival:
            t, _, kind, what = heapq.heappop(events)
        else:
            t, kind, what = next_arrival, "arrive", None
        if t > until:
            break
        if queue or any(r.in_flight for r in replicas):
            out.busy_s += t - last_t
        for r in replicas:
            if r.holds_gpu:
                use = _use(r)
                out.gpu_by[use] = out.gpu_by.get(use, 0.0) + t - last_t
                if not NIGHT_ENDS <= last_t % DAY_S < NIGHT_STARTS:
                    out.gpu_night_s += t - last_t
        last_t = t
        if kind == "arrive":
            arrival_i += 1
            if not dispatch(t, t):
                queue.append(t)
        elif kind == "done":
            assert isinstance(what, Replica)
            r = what
            r.in_flight -= 1
            if queue and r.routed and r.state in ("active", "waking"):
                start(r, queue.popleft(), max(t, r.ready_at))
            elif r.in_flight == 0:
                r.idle_since = t
                if r.state == "draining":
                    replicas.remove(r)
                elif setup.idle_park_s is not None:
                    push(t + setup.idle_park_s, "idle", r)
        elif kind == "ready":
            assert isinstance(what, Replica)
            r = what
            if r in replicas and r.state in ("starting", "waking"):
                r.state = "active"
                while queue and r.in_flight < SLOTS:
                    start(r, queue.popleft(), t)
        elif kind == "idle":
            assert isinstance(what, Replica)
            r = what
            if (
                r in replicas
                and r.state == "active"
                and r.in_flight == 0
                and r.idle_since + (setup.idle_park_s or 0) <= t
            ):
                park(r, t, idle=True)
        elif kind == "parked":
            assert isinstance(what, tuple)
            r, parks = what
            if r in replicas and r.state == "parking" and r.parks == parks:
                r.state = "parked"
                if r.wake_after_park:  # requests came while parking: wake for them
                    r.state = "waking"
                    out.wakes += 1
                    push(r.ready_at, "ready", r)
        elif kind == "tick":
            push(t + TICK_S, "tick", None)
            if setup.fixed is not None:
                continue
            in_flight = sum(r.in_flight for r in replicas) + len(queue)
            ready = sum(r.state in ("active", "waking", "parking", "parked") for r in replicas)
            samples.append(Sample(t, float(in_flight), ready))
            while samples[0].time <= t - setup.policy.stable_window_s:
                samples.popleft()
            decision = desired(list(samples), setup.policy, state, t)
            state = decision.state
            wanted = decision.replicas
            if wanted == 0 and setup.grace_s:
                zero_since = t if zero_since is None else zero_since
                if t - zero_since < setup.grace_s:
                    wanted = 1
            else:
                zero_since = None
            live = [r for r in replicas if r.state != "draining"]
            for _ in range(wanted - len(live)):
                replicas.append(Replica("starting", ready_at=t + setup.cold_start_s))
                out.cold_starts += 1
                push(t + setup.cold_start_s, "ready", replicas[-1])
            # The operator's loop: routing first (operator/routing.py, the same code), so the
            # ReplicaSet's scale-down takes unrouted pods first (their deletion cost is lower).
            views = [
                routing.Replica(r.name, r.routed, r.state in ("parking", "parked"),
                                r.in_flight, True, r.unrouted_since)
                for r in live if r.state != "starting"
            ]  # fmt: skip
            standby = setup.idle_park_s is not None and setup.policy.standby
            change = routing.plan(views, decision.active, standby=standby, hold=decision.held,
                                  now=t, drain_s=DRAIN_S)  # fmt: skip
            for r in live:
                if r.name in change.route:
                    r.routed, r.unrouted_since = True, None
                elif r.name in change.unroute:
                    r.routed, r.unrouted_since = False, t
                if r.name in change.park and r.state == "active":  # a waking runtime ignores it
                    park(r, t, idle=False)
                elif r.name in change.wake and r.state == "parked":
                    wake(r, t)
                elif r.name in change.wake and r.state == "parking":
                    r.state = "active"  # the runtime gives the park up
            order = {"parked": 0, "parking": 0, "starting": 1, "waking": 2, "active": 3}
            for r in sorted(live, key=lambda r: (r.routed, order[r.state], r.in_flight))[
                : max(0, len(live) - wanted)
            ]:
                if r.in_flight:
                    r.state, r.routed = "draining", False
                else:
                    replicas.remove(r)
            out.most_replicas = max(out.most_replicas, sum(r.state != "draining" for r in replicas))
    return out


# ---- reports -------------------------------------------------------------------------------


def _bullet(text: str) -> str:
    return textwrap.fill(text, 96, initial_indent="- ", subsequent_indent="  ")


def after_idle(arrivals: list[float]) -> set[float]:
    """Arrivals at least IDLE_GAP_S after the previous one, and those AFTER_IDLE_S behind them."""
    marked, wave_start, previous = set(), -math.inf, -math.inf
    for a in arrivals:
        if a - previous >= IDLE_GAP_S:
            wave_start = a
        if a - wave_start <= AFTER_IDLE_S:
            marked.add(a)
        previous = a
    return marked


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else math.nan


@dataclass(frozen=True)
class Row:
    name: str
    slo: float
    slo_after_idle: float
    p99: float
    gpu_h: float
    gpu_by_h: dict[str, float]
    night_h: float
    busy_h: float
    cold_starts: int
    wakes: int
    most: int


def summarize(name: str, out: Outcome, idle: set[float]) -> Row:
    under = [ttft < SLO_S for _, ttft in out.ttft]
    after = [ttft < SLO_S for a, ttft in out.ttft if a in idle]
    return Row(name, sum(under) / len(under), sum(after) / max(1, len(after)),
               quantile([x for _, x in out.ttft], 0.99), out.gpu_s / 3600,
               {k: v / 3600 for k, v in out.gpu_by.items()}, out.gpu_night_s / 3600,
               out.busy_s / 3600, out.cold_starts, out.wakes,
               out.most_replicas)  # fmt: skip


def day_table(rows: list[Row], kpa_name: str) -> str:
    lines = [
        "| policy | TTFT < 1 s | after idle < 1 s | TTFT p99 (s) | GPU-hours | vs KPA | cold starts | wakes | most replicas |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    kpa = next(r for r in rows if r.name == kpa_name).gpu_h
    for r in rows:
        lines.append(
            f"| {r.name} | {100 * r.slo:.2f}% | {100 * r.slo_after_idle:.2f}% | {r.p99:.2f} | "
            f"{r.gpu_h:.1f} | {r.gpu_h / kpa:.0%} | {r.cold_starts} | {r.wakes} | {r.most} |"
        )
    return "\n".join(lines)


def use_table(rows: list[Row]) -> str:
    lines = [
        "| policy | GPU-hours | " + " | ".join(USES) + " | of all, at night | "
        "hours with a request in flight |",
        "| --- | ---: | " + " | ".join("---:" for _ in USES) + " | ---: | ---: |",
    ]
    for r in rows:
        uses = " | ".join(f"{r.gpu_by_h.get(u, 0.0):.2f}" for u in USES)
        lines.append(f"| {r.name} | {r.gpu_h:.2f} | {uses} | {r.night_h:.2f} | {r.busy_h:.2f} |")
    return "\n".join(lines)


def ramp_rows(
    arrivals: list[float], out: Outcome, ramp_s: float, hold_s: float
) -> tuple[list[float], float]:
    """p99 TTFT per minute of the ramp, and the steady p99 (the last 4 minutes of the hold)."""
    minutes = [
        quantile([x for a, x in out.ttft if m * 60 <= a < (m + 1) * 60], 0.99)
        for m in range(int(ramp_s // 60))
    ]
    steady = quantile([x for a, x in out.ttft if a >= ramp_s + hold_s - 240], 0.99)
    return minutes, steady


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cold-start-s", type=float, default=46.5, help="new replica to first token (measured)"
    )
    parser.add_argument("--wake-s", type=float, default=0.335, help="parked to serving (measured)")
    parser.add_argument("--park-s", type=float, default=0.2, help="serving to parked (measured)")
    parser.add_argument(
        "--idle-park-s", type=float, default=30.0, help="Berth's standby.idleSeconds in this run"
    )
    parser.add_argument(
        "--base-peak", type=float, default=6.0, help="daytime base req/s at its peak"
    )
    parser.add_argument("--burst-rate", type=float, default=20.0, help="extra req/s during a burst")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "autoscale.md"
    )
    args = parser.parse_args()
    started = time.monotonic()

    arrivals = day_trace(args.seed, args.base_peak, args.burst_rate)
    idle = after_idle(arrivals)
    kpa = Policy(
        target_concurrency=TARGET_CONCURRENCY,
        min_replicas=0,
        standby=False,
        scale_to_zero=True,
        scale_down_delay_s=0,
    )
    berth = Policy(target_concurrency=TARGET_CONCURRENCY)
    standby = {"wake_s": args.wake_s, "park_s": args.park_s, "idle_park_s": args.idle_park_s}
    kpa_name = f"KPA, cold start {args.cold_start_s:g} s"
    runs: list[tuple[str, Setup]] = [
        (
            "Berth (defaults)",
            Setup("berth", berth, args.cold_start_s, **standby),
        ),
    ]
    berth_out = simulate(arrivals, runs[0][1], args.seed, DAY_S)
    per_replica = TARGET_CONCURRENCY * 0.7
    e2e = _level(int(per_replica))[0] + OUTPUT_TOKENS * _level(int(per_replica))[3]
    fixed_n = math.ceil((args.base_peak + args.burst_rate) * e2e / per_replica)  # peak demand
    pool = Policy(target_concurrency=TARGET_CONCURRENCY, min_replicas=fixed_n)
    long_delay = Policy(target_concurrency=TARGET_CONCURRENCY, scale_down_delay_s=1800)
    runs += [
        (
            "Berth, scaleDownDelaySeconds 1800",
            Setup("delay", long_delay, args.cold_start_s, **standby),
        ),
        (
            f"Berth, standby pool of {fixed_n}",
            Setup(
                "pool",
                pool,
                args.cold_start_s,
                **standby,
                start_replicas=fixed_n,
            ),
        ),
        (
            f"Berth, standby pool of {fixed_n}, idleSeconds {CRD_IDLE_S:g} (the CRD default)",
            Setup(
                "pool-300",
                pool,
                args.cold_start_s,
                **{**standby, "idle_park_s": CRD_IDLE_S},
                start_replicas=fixed_n,
            ),
        ),
        (
            kpa_name,
            Setup("kpa", kpa, args.cold_start_s, grace_s=KPA_GRACE_S),
        ),
        ("KPA, cold start 15 s", Setup("kpa15", kpa, 15.0, grace_s=KPA_GRACE_S)),
        ("KPA, cold start 90 s", Setup("kpa90", kpa, 90.0, grace_s=KPA_GRACE_S)),
        (f"Fixed {fixed_n} replicas", Setup("fixed", berth, 0.0, fixed=fixed_n)),
    ]
    outcomes = {runs[0][0]: berth_out}
    for name, setup in runs[1:]:
        outcomes[name] = simulate(arrivals, setup, args.seed, DAY_S)
    rows = [summarize(name, outcomes[name], idle) for name, _ in runs]
    day = day_table(rows, kpa_name)
    uses = use_table(rows)

    # 1 -> 16 replicas: in flight from one replica's target to sixteen's over 10 minutes.
    ramp_s, hold_s = 600.0, 300.0
    ramp = ramp_trace(args.seed, per_replica / e2e, 16 * per_replica / e2e, ramp_s, hold_s)
    ramp_runs = [
        (
            "Berth, 16 replicas parked at the start (minReplicas 16)",
            Setup(
                "r-pool",
                Policy(target_concurrency=TARGET_CONCURRENCY, min_replicas=16),
                args.cold_start_s,
                **standby,
                start_replicas=16,
            ),
        ),
        (
            f"from 1 replica, new ones cold-start in {args.cold_start_s:g} s (KPA, or Berth without a pool)",
            Setup("r-cold", berth, args.cold_start_s),
        ),
    ]
    ramp_lines = [
        "| policy | steady p99 (s) | worst minute p99 (s) | worst / steady | <= 2x | TTFT < 1 s | p99 per minute (s) |",
        "| --- | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for name, setup in ramp_runs:
        out = simulate(ramp, setup, args.seed, ramp_s + hold_s)
        minutes, steady = ramp_rows(ramp, out, ramp_s, hold_s)
        under = sum(x < SLO_S for _, x in out.ttft) / len(out.ttft)
        worst = max(minutes)
        ramp_lines.append(
            f"| {name} | {steady:.2f} | {worst:.2f} | {worst / steady:.1f}x | "
            f"{'met' if worst <= 2 * steady else 'NOT met'} | {100 * under:.2f}% | "
            + " ".join(f"{m:.2f}" for m in minutes)
            + " |"
        )
    ramp_table = "\n".join(ramp_lines)

    kpa_row = next(r for r in rows if r.name == kpa_name)
    pool_row = next(r for r in rows if r.name == f"Berth, standby pool of {fixed_n}")
    residency = _bullet(
        "Residency follows the 6 s window at the full target while pods follow the 60 s one at "
        "70 % (``autoscaler.py``): replicas that the stable window, panic or the delay still "
        "keep leave the rotation and park within seconds of the demand falling instead of "
        "holding their GPU. With nothing in flight over the 6 s window the decision wants no "
        "replica active, and the operator parks the last one too (``routing.py``): it stays in "
        f"the rotation, and the next request wakes it ({args.wake_s} s, or the rest of a "
        f"{args.park_s} s park and a wake if it comes while the park runs). Before that change "
        "the last replica stayed resident until its own ``idleSeconds`` ran out: in the run "
        "recorded at commit 0ec597f (same trace and settings, parks taken as instant) the pool "
        "spent 14.2 GPU-hours (62 % of KPA's), 1.32 of them idle, 0.76 of those in that one "
        "replica (0.52 at night, about 30 s after each request); rerun with the CRD's default of "
        "300 s, the same pool spent 18.5 (80 %). Now ``idleSeconds`` parks only runtimes that "
        "Berth's autoscaler does not scale, and the two pool rows are the same."
    )
    left = _bullet(
        f"What is left ({pool_row.name}, {pool_row.gpu_h:.2f} GPU-hours, "
        f"{pool_row.gpu_h / kpa_row.gpu_h:.0%} of KPA's): {pool_row.gpu_by_h.get('serving', 0.0):.2f} "
        f"serving, against {pool_row.busy_h:.2f} hours with a request in flight at all, when some "
        "replica must be resident; the difference is time when two or three replicas serve at "
        f"once: bursts beyond the target of {TARGET_CONCURRENCY:.0f} per replica, and replicas "
        "finishing their requests after leaving the rotation. "
        f"{pool_row.gpu_by_h.get('idle, routed', 0.0):.2f} idle in the rotation: the one replica "
        "between requests less than the 6 s window apart (at dawn and dusk) and for the window "
        f"after each request at night; {pool_row.gpu_by_h.get('idle, unrouted', 0.0):.2f} idle "
        f"out of it: surplus replicas for the {DRAIN_S:.0f} s that kube-proxy is given before "
        f"they park; {pool_row.gpu_by_h.get('cold start', 0.0):.2f} in {pool_row.cold_starts} cold "
        "starts of a fourth pod that the stable window asks for in the largest bursts. Most of "
        "every autoscaled policy's GPU time is serving: that, not idle time, bounds what any "
        "autoscaler can save on this trace."
    )
    lines = []
    for row in (r for r in rows if r.name.startswith("Berth")):
        checks = [
            (row.slo >= kpa_row.slo, f"{100 * row.slo:.2f}% vs {100 * kpa_row.slo:.2f}%"),
            (row.gpu_h <= 0.6 * kpa_row.gpu_h, f"{row.gpu_h / kpa_row.gpu_h:.0%}"),
            (row.slo_after_idle >= 0.99, f"{100 * row.slo_after_idle:.2f}%"),
        ]
        marks = " | ".join(f"{'met' if ok else 'NOT met'} ({how})" for ok, how in checks)
        lines.append(f"| {row.name} | {marks} |")
    verdict = (
        "| Berth policy | TTFT < 1 s at least KPA's | GPU-hours <= 60% of KPA's | "
        "after idle >= 99% under 1 s |\n| --- | --- | --- | --- |\n" + "\n".join(lines)
    )
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    flags = {k.replace("_", "-"): v for k, v in vars(args).items() if k != "out"}
    command = " ".join(f"--{k} {v}" for k, v in flags.items())
    report = f"""# Autoscaling: Berth's scale to standby against Knative's KPA and a fixed count (simulation)

{stamp}; `python benchmarks/autoscale.py {command}`;
{len(arrivals)} requests over one day (seed {args.seed}); {time.monotonic() - started:.0f} s on {platform.node() or "this machine"}.
A simulation, not a cluster run: the decisions are the operator's own `autoscaler.desired`, the
service times, wake and cold start come from recorded measurements (below).

## Inputs

| input | value | source |
| --- | --- | --- |
| TTFT p50 / p90 at 1, 16, 64 streams | 37 / 42, 149 / 185, 209 / 479 ms | measured: `benchmarks/results/serve-h100.md` (llama-3-8b, H100, 512 + 256 tokens) |
| TTFT p99 | p90 x {P99_OVER_P90:.2f} | measured ratio at 64 streams, same file (its 16-stream p99, 1.60 s from 96 requests, is one slow request) |
| inter-token latency p50 at 1, 16, 64 streams | 7.08, 8.36, 12.54 ms | measured: same file |
| streams per replica | {SLOTS} | the highest level measured in the same file |
| wake (parked -> serving) | {args.wake_s} s | measured: `benchmarks/results/standby-h200.md` (llama-3-8b, 16 GB, H200; first token after a wake 0.346 s) |
| park (resident -> parked; the GPU share is held until it ends) | {args.park_s} s | measured: same file (median 199.5 ms) |
| cold start (new replica -> serving) | {args.cold_start_s} s (rows at 15 and 90 s) | measured: same file (new process to first token, model files not cached); a pod adds scheduling and container start |
| targetConcurrency | {TARGET_CONCURRENCY:.0f} (x 0.7 utilisation), both autoscalers | this run's setting |
| Berth standby.idleSeconds | {args.idle_park_s} s ({CRD_IDLE_S:g} s in one row) | this run's setting; {CRD_IDLE_S:g} s is the CRD's default |
| KPA scale-to-zero grace | {KPA_GRACE_S:.0f} s | Knative's default |

Trace: one request per 10 minutes on average at night (22:00-07:00); by day a base rising to
{args.base_peak} req/s at 14:00, idle gaps of 5-20 minutes (about one an hour) and bursts of
+{args.burst_rate} req/s for 1-4 minutes (about two an hour). "After idle": requests arriving at
least {IDLE_GAP_S:.0f} s after the previous one, and those within {AFTER_IDLE_S:.0f} s behind them
({len(idle)} requests). GPU-hours count every replica that holds its GPU share: serving,
cold-starting, waking, parking or draining; a parked replica holds none.

## One day

{day}

Targets (issue 21), against KPA with the measured cold start ({args.cold_start_s:g} s):

{verdict}

Where the GPU-hours go (a replica holds its share while serving at least one request, idle
but resident, in the Service's rotation or out of it, cold-starting, waking or parking;
draining counts as serving). The last column is not GPU time: the hours in which at least one
request was in flight or queued, which some replica had to be resident for:

{uses}

## 1 to 16 replicas

In flight rises from one replica's target ({per_replica:.1f}) to sixteen's over {ramp_s / 60:.0f}
minutes, then holds {hold_s / 60:.0f} minutes; the steady p99 is that of the last 4 minutes.
Target: no minute's p99 above 2x the steady p99 (Run:ai's anchor: 1 to 16 replicas of a
Llama 3.1 8B service with no TTFT spikes).

{ramp_table}

## Reading

- KPA's cold starts cost twice: the requests that arrive after an idle period wait for one, and
  while they wait they count as in flight, so the panic window asks for many replicas at once,
  each of which holds its GPU through its own cold start. A parked replica serves the first
  request after idle within the wake time, so the after-idle column is the wake plus one TTFT.
- With Berth's defaults (minReplicas 1, 120 s delay) a burst that outgrows the one replica still
  needs new pods, and they cold-start as KPA's do: that is where its GPU-hours and slow requests
  come from. Parked replicas cost no GPU, so a standby pool (minReplicas above the usual need, all
  parked while idle) or a long scale-down delay turns those cold starts into wakes; the pool is
  the configuration to compare with KPA on a bursty service.
{residency}
{left}

## What this does and does not show

- Routing is the operator's own decision (``routing.plan``); the Service's kube-proxy spreads
  requests at random over the routed pods, which the simulation models as least-loaded.
- One trace (seed {args.seed}). The margin to the 60 % target is small: with ``--seed`` 2 to 5
  the standby pool spent 55 to 59 % of KPA's GPU-hours (not recorded here).
- Wake and cold start are measured on the H200 (`standby-h200.md`); TTFT and inter-token
  latency by concurrency are the H100's (`serve-h100.md`): the serving benchmark has not been
  rerun on the H200.
"""
    args.out.write_text(report)
    print(day)
    print()
    print(ramp_table)
    print()
    print(verdict)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
