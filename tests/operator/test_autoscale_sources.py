"""The autoscaler's metric sources against real parts: the runtime's own metric collector served
over HTTP on loopback, and a real Prometheus scraping it where the binary is installed (Debian's
``prometheus`` package)."""

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from metrics_harness import runtime_registry, serving
from prometheus_client import generate_latest

from berth.e2e import prometheus
from berth.operator import concurrency
from berth.operator.concurrency import (
    MetricsUnavailable,
    PodScraper,
    PodTarget,
    PrometheusSource,
    ReplicaReading,
    parse_metrics,
    parse_prometheus,
    sample,
)


@pytest.fixture
def runtimes() -> Iterator[dict[str, str]]:
    """Three runtimes' /metrics on loopback: busy, parked with a queued request, and idle."""
    names = ["svc-abc-1", "svc-abc-2", "svc-abc-3"]
    with serving((3, 2, "active"), (0, 1, "standby"), (0, 0, "active")) as ports:
        yield {n: f"http://127.0.0.1:{port}" for n, port in zip(names, ports, strict=True)}


def test_a_runtimes_exposition_gives_running_plus_waiting_and_its_state() -> None:
    busy = parse_metrics(generate_latest(runtime_registry(5, 7)).decode(), observed=10.0)
    assert busy == ReplicaReading(12.0, parked=False, time=10.0)
    for state, parked in [("standby", True), ("parking", True), ("waking", False)]:
        text = generate_latest(runtime_registry(0, 1, state)).decode()
        assert parse_metrics(text, 0.0).parked is parked


def test_an_exposition_without_the_in_flight_series_is_refused() -> None:
    with pytest.raises(ValueError, match="berth_requests_waiting"):
        parse_metrics("# TYPE berth_requests_running gauge\nberth_requests_running 1\n", 0.0)


def test_pods_that_answer_count_and_one_that_does_not_is_missing(runtimes: dict[str, str]) -> None:
    with socket.socket() as closed:  # a port that nothing listens on
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
    targets = [PodTarget(n, u) for n, u in runtimes.items()] + [PodTarget("svc-abc-4", dead)]

    async def read() -> dict[str, ReplicaReading]:
        async with httpx.AsyncClient() as http:
            return await PodScraper(http, timeout_s=2.0).read(targets, time.time())

    readings = asyncio.run(read())
    assert set(readings) == {"svc-abc-1", "svc-abc-2", "svc-abc-3"}
    got = sample([t.name for t in targets], readings, now=time.time())
    assert (got.concurrency, got.ready, got.parked, got.missing) == (6.0, 4, 1, 1)


def test_a_sample_is_as_old_as_its_oldest_reading() -> None:
    readings = {"a": ReplicaReading(1, False, 100.0), "b": ReplicaReading(2, False, 90.0)}
    got = sample(["a", "b", "gone"], readings, now=120.0)
    assert (got.time, got.concurrency, got.missing) == (90.0, 3.0, 1)
    assert sample([], {}, now=120.0).time == 120.0


def prometheus_body(series: list[tuple[dict[str, str], list[tuple[float, str]]]]) -> Any:
    return {
        "status": "success",
        "data": {
            "resultType": "matrix",
            "result": [{"metric": m, "values": [list(v) for v in values]} for m, values in series],
        },
    }


def test_a_prometheus_answer_gives_a_reading_per_pod_from_each_series_newest_sample() -> None:
    body = prometheus_body([
        ({"__name__": "berth_requests_running", "pod": "a"}, [(10.0, "1"), (20.0, "4")]),
        ({"__name__": "berth_requests_waiting", "pod": "a"}, [(20.0, "2")]),
        ({"__name__": "berth_standby_state", "pod": "a", "state": "active"}, [(20.0, "1")]),
        ({"__name__": "berth_requests_running", "pod": "b"}, [(15.0, "0")]),
        ({"__name__": "berth_requests_waiting", "pod": "b"}, [(14.0, "1")]),
        ({"__name__": "berth_standby_state", "pod": "b", "state": "standby"}, [(14.0, "1")]),
        ({"__name__": "berth_requests_running", "pod": "c"}, [(20.0, "9")]),  # half a pod
    ])  # fmt: skip
    assert parse_prometheus(body) == {
        "a": ReplicaReading(6.0, False, 20.0),
        "b": ReplicaReading(1.0, True, 14.0),
    }


def test_a_refused_or_garbled_prometheus_answer_is_unavailable_not_zero() -> None:
    with pytest.raises(MetricsUnavailable, match="parse error"):
        parse_prometheus({"status": "error", "errorType": "bad_data", "error": "parse error"})
    with pytest.raises(MetricsUnavailable):
        parse_prometheus({"status": "success", "data": {"resultType": "vector", "result": []}})


def test_the_query_is_a_range_selector_of_the_services_series() -> None:
    selector = concurrency.service_selector(None, "team-a", "llama")
    assert selector == 'namespace="team-a",pod=~"llama-[a-z0-9]+-[a-z0-9]+"'
    query = concurrency.prometheus_query(selector)
    assert query.startswith('{__name__=~"berth_requests_running|berth_requests_waiting|')
    assert query.endswith(f"{selector}}}[{concurrency.PROMETHEUS_RANGE_S}s]")
    assert concurrency.service_selector('job="x",svc="{name}"', "n", "s") == 'job="x",svc="s"'


def test_prometheus_that_cannot_be_reached_is_unavailable() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"

    async def read() -> None:
        async with httpx.AsyncClient() as http:
            await PrometheusSource(http, url, timeout_s=1.0).read('pod="x"')

    with pytest.raises(MetricsUnavailable, match="Prometheus at"):
        asyncio.run(read())


@pytest.mark.skipif(
    prometheus.BINARY is None, reason="Debian's prometheus package is not installed"
)
def test_a_real_prometheus_scraping_runtimes_gives_the_same_readings(
    runtimes: dict[str, str], tmp_path: Path
) -> None:
    """Prometheus scrapes the three runtimes every second, labelling each with its pod name as
    Kubernetes service discovery would; the source reads them back through the HTTP API."""
    scrape_configs = [
        {
            "job_name": name,
            "scrape_interval": "1s",
            "static_configs": [
                {"targets": [url.split("/")[2]], "labels": {"namespace": "ns", "pod": name}}
            ],
        }
        for name, url in runtimes.items()
    ]
    selector = concurrency.service_selector(None, "ns", "svc")

    async def read_until_all_three(url: str) -> dict[str, ReplicaReading]:
        async with httpx.AsyncClient() as http:
            source = PrometheusSource(http, url)
            readings: dict[str, ReplicaReading] = {}
            for _ in range(60):  # at most 30 s: the first scrapes
                try:
                    readings = await source.read(selector)
                except MetricsUnavailable:
                    readings = {}
                if len(readings) == 3:
                    return readings
                await asyncio.sleep(0.5)
            return readings

    with prometheus.serving({"scrape_configs": scrape_configs}, tmp_path) as url:
        readings = asyncio.run(read_until_all_three(url))
    assert {n: (r.in_flight, r.parked) for n, r in readings.items()} == {
        "svc-abc-1": (5.0, False),
        "svc-abc-2": (1.0, True),
        "svc-abc-3": (0.0, False),
    }
    assert all(abs(r.time - time.time()) < 60 for r in readings.values())


def test_the_metric_names_come_from_the_runtime_without_its_engine() -> None:
    """The operator reads the runtime's metric table; importing it must not pull torch into the
    operator's process (or image)."""
    code = (
        "import sys, berth.operator.autoscale_loop;"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'triton')]"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
