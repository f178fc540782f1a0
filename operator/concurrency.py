"""How many requests a service's replicas hold in flight: the autoscaler's input.

Two sources, one shape. ``PodScraper`` reads each ready runtime pod's ``/metrics`` directly (the
default, ``autoscaling.metrics: Pods``); ``PrometheusSource`` asks Prometheus' HTTP API
(``/api/v1/query``) for the same series (``metrics: Prometheus``), for clusters where the
operator should not reach pods or where Prometheus already scrapes them. Both give one
``ReplicaReading`` per pod they could read; ``sample`` turns those and the ready pods into the
autoscaler's ``Sample``, counting every ready pod that could not be read as missing (so its
silence never looks like zero demand).

In flight is running + waiting (``berth_requests_running`` + ``berth_requests_waiting``, names
from the runtime's metric table); a pod whose ``berth_standby_state`` is ``parking`` or
``standby`` counts as parked. The parsers are pure; the readers are thin ``httpx`` calls.
"""

import asyncio
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ValidationError

from berth.operator.autoscaler import Sample
from berth.runtime.server.metrics import REQUESTS_RUNNING, REQUESTS_WAITING, STANDBY_STATE

IN_FLIGHT = (REQUESTS_RUNNING.berth, REQUESTS_WAITING.berth)
PARKED_STATES = ("parking", "standby")  # the runtime's states that hold no GPU memory
SCRAPE_TIMEOUT_S = 1.0
PROMETHEUS_TIMEOUT_S = 3.0
# Series older than this are not read from Prometheus (its own lookback is 5 minutes).
PROMETHEUS_RANGE_S = 30
DEFAULT_SELECTOR = 'namespace="{namespace}",pod=~"{name}-[a-z0-9]+-[a-z0-9]+"'


class MetricsUnavailable(Exception):
    """The source as a whole could not be read (Prometheus down, a refused query)."""


@dataclass(frozen=True)
class ReplicaReading:
    in_flight: float  # running + waiting requests
    parked: bool
    time: float  # seconds since the epoch the values were observed


@dataclass(frozen=True)
class PodTarget:
    """A ready runtime pod, where it answers, and whether its Service routes to it."""

    name: str
    base: str  # http://<pod IP>:<port>
    routed: bool = True
    unrouted_since: float | None = None  # seconds since the epoch

    @property
    def url(self) -> str:
        return f"{self.base}/metrics"


def parse_metrics(text: str, observed: float) -> ReplicaReading:
    """One runtime's Prometheus text exposition -> its reading; ValueError when the in-flight
    series are absent (not a Berth runtime, or a broken one)."""
    values: dict[str, float] = {}
    parked = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in IN_FLIGHT:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
            elif sample.name == STANDBY_STATE.berth and sample.value == 1.0:
                parked = parked or sample.labels.get("state") in PARKED_STATES
    if set(values) != set(IN_FLIGHT):
        raise ValueError(f"no {' or '.join(sorted(set(IN_FLIGHT) - set(values)))} series")
    return ReplicaReading(sum(values.values()), parked, observed)


class _Series(BaseModel):
    metric: dict[str, str]
    values: list[tuple[float, str]]


class _Data(BaseModel):
    resultType: Literal["matrix"]  # Prometheus' spelling
    result: list[_Series]


class _Response(BaseModel):
    """The body of Prometheus' ``/api/v1/query`` for a range-vector selector."""

    status: Literal["success", "error"]
    data: _Data | None = None
    error: str | None = None


def prometheus_query(selector: str) -> str:
    """The series of one service's runtimes over the last ``PROMETHEUS_RANGE_S``: a range
    selector, so that each sample keeps the time it was scraped at (an instant vector would
    carry the query's time and hide a target that stopped being scraped)."""
    names = "|".join((*IN_FLIGHT, STANDBY_STATE.berth))
    return f'{{__name__=~"{names}",{selector}}}[{PROMETHEUS_RANGE_S}s]'


def parse_prometheus(body: Any) -> dict[str, ReplicaReading]:
    """A query response -> a reading per ``pod`` label, from each series' newest sample; a pod
    only partly present (one in-flight series missing) is left out, so it counts as missing."""
    try:
        response = _Response.model_validate(body)
    except ValidationError as error:
        raise MetricsUnavailable(f"not a range-vector query response: {error}") from error
    if response.status != "success" or response.data is None:
        raise MetricsUnavailable(f"Prometheus refused the query: {response.error}")
    found: dict[str, dict[str, float]] = {}
    times: dict[str, float] = {}
    parked: set[str] = set()
    for series in response.data.result:
        pod, name = series.metric.get("pod"), series.metric.get("__name__")
        if pod is None or name is None or not series.values:
            continue
        at, raw = series.values[-1]
        value = float(raw)
        if math.isnan(value):
            continue
        times[pod] = min(times.get(pod, at), at)
        if name in IN_FLIGHT:
            per_pod = found.setdefault(pod, {})
            per_pod[name] = per_pod.get(name, 0.0) + value
        elif (
            name == STANDBY_STATE.berth
            and value == 1.0
            and series.metric.get("state") in PARKED_STATES
        ):
            parked.add(pod)
    return {
        pod: ReplicaReading(sum(values.values()), pod in parked, times[pod])
        for pod, values in found.items()
        if set(values) == set(IN_FLIGHT)
    }


def sample(ready: Iterable[str], readings: Mapping[str, ReplicaReading], now: float) -> Sample:
    """The autoscaler's sample from the ready pods' names and what could be read of them; its
    time is the oldest reading's (``now`` when none), so stale readings make a stale sample."""
    names = list(ready)
    read = [readings[n] for n in names if n in readings]
    return Sample(
        time=min((r.time for r in read), default=now),
        concurrency=sum(r.in_flight for r in read),
        ready=len(names),
        parked=sum(r.parked for r in read),
        missing=len(names) - len(read),
    )


class PodScraper:
    """Reads ``/metrics`` of every pod at once; a pod that does not answer in time is missing."""

    def __init__(self, http: httpx.AsyncClient, timeout_s: float = SCRAPE_TIMEOUT_S) -> None:
        self.http, self.timeout_s = http, timeout_s

    async def read(self, pods: Iterable[PodTarget], now: float) -> dict[str, ReplicaReading]:
        """Each pod's reading, observed at ``now``."""
        targets = list(pods)
        results = await asyncio.gather(*(self._one(p, now) for p in targets))
        return {p.name: r for p, r in zip(targets, results, strict=True) if r is not None}

    async def _one(self, pod: PodTarget, now: float) -> ReplicaReading | None:
        try:
            response = await self.http.get(pod.url, timeout=self.timeout_s)
            response.raise_for_status()
            return parse_metrics(response.text, now)
        except (httpx.HTTPError, ValueError):
            return None


class PrometheusSource:
    """Reads one service's runtime series from Prometheus' HTTP API."""

    def __init__(
        self, http: httpx.AsyncClient, url: str, timeout_s: float = PROMETHEUS_TIMEOUT_S
    ) -> None:
        self.http, self.url, self.timeout_s = http, url.rstrip("/"), timeout_s

    async def read(self, selector: str) -> dict[str, ReplicaReading]:
        query = prometheus_query(selector)
        try:
            response = await self.http.get(
                f"{self.url}/api/v1/query", params={"query": query}, timeout=self.timeout_s
            )
        except httpx.HTTPError as error:
            raise MetricsUnavailable(f"Prometheus at {self.url}: {error}") from error
        if response.status_code >= 500:
            raise MetricsUnavailable(f"Prometheus at {self.url}: HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError as error:
            raise MetricsUnavailable(f"Prometheus at {self.url} sent no JSON") from error
        return parse_prometheus(body)


def service_selector(template: str | None, namespace: str, name: str) -> str:
    """The PromQL matchers of one service's series (``prometheusSelector``, else the default)."""
    return (template or DEFAULT_SELECTOR).replace("{namespace}", namespace).replace("{name}", name)
