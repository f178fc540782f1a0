"""Autoscaling on concurrency with real parts (ARCHITECTURE section 6): runtime pods on the real
node serving the tiny model on the CPU, a real Prometheus discovering and scraping them, and a
bounded load through the Service's ClusterIP. Under load the operator scales the Deployment up;
when the load stops the count comes back down and the last replica parks (scale to standby, not
to zero); a new burst wakes it. No request fails on the way.
"""

import threading
import urllib.error
from pathlib import Path
from typing import Any

import pytest

from berth.cluster.cluster import LocalCluster
from berth.e2e.operator_fixtures import OperatorProcess, apply_docs, get_json, wait_for
from berth.e2e.prometheus import BINARY, query, running_prometheus
from berth.e2e.real_node import cluster_ip, post, ready_pod, real_service, routed_post, tenants
from berth.operator import render

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.usefixtures("needs_real_node"),
    pytest.mark.skipif(BINARY is None, reason="Debian's prometheus package is not installed"),
]
BODY = {"model": "elastic", "prompt": "Once upon a time", "max_tokens": 32, "temperature": 0}


class Load:
    """``streams`` closed-loop clients, each sending a completion as soon as the last ended."""

    def __init__(self, url: str, streams: int) -> None:
        self.url, self.stop = url, threading.Event()
        self.ok, self.failures = 0, list[str]()
        self.threads = [threading.Thread(target=self._client) for _ in range(streams)]
        for thread in self.threads:
            thread.start()

    def _client(self) -> None:
        while not self.stop.is_set():
            try:
                answer = post(self.url, BODY, timeout=120)
                assert answer["usage"]["completion_tokens"] == BODY["max_tokens"], answer
                self.ok += 1
            except (urllib.error.URLError, OSError, AssertionError) as error:
                self.failures.append(repr(error))

    def end(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=180)


def status(cluster: LocalCluster, namespace: str) -> dict[str, Any]:
    found: dict[str, Any] = get_json(cluster, "bis", "elastic", "-n", namespace).get("status") or {}
    return found


def test_real_pods_scale_up_under_load_park_when_idle_and_wake_for_the_next_burst(
    cluster: LocalCluster,
    operator: OperatorProcess,
    namespace: str,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    wait_for(
        "earlier tests' pods to leave the real node", lambda: not tenants(cluster), timeout=120
    )
    with running_prometheus(cluster, namespace, render.PORT, tmp_path) as prometheus:
        service = real_service("elastic", namespace, tiny_model, fraction=0.25,
                               minReplicas=1, maxReplicas=2, standby={"idleSeconds": 4},
                               autoscaling={"targetConcurrency": 1, "targetUtilization": 1.0,
                                            "stableWindowSeconds": 6, "panicWindowSeconds": 2,
                                            "scaleDownDelaySeconds": 0, "metrics": "Prometheus",
                                            "prometheusUrl": prometheus})  # fmt: skip
        apply_docs(cluster, [service])
        wait_for("the first runtime pod Ready", lambda: ready_pod(cluster, namespace), timeout=240)
        url = f"http://{cluster_ip(cluster, 'elastic', namespace)}:{render.PORT}/v1/completions"
        routed_post(url, BODY)
        wait_for("Prometheus to scrape the runtime",
                 lambda: query(prometheus, f'berth_requests_running{{namespace="{namespace}"}}'),
                 timeout=60)  # fmt: skip

        # Four streams on one replica targeted at one each: the operator asks for the maximum.
        load = Load(url, streams=4)
        try:
            scaled = wait_for(
                "two replicas Ready under load",
                lambda: (s := status(cluster, namespace)).get("readyReplicas") == 2 and s,
                timeout=240,
            )
            assert scaled["desiredReplicas"] == 2, scaled
            deployment = get_json(cluster, "deployment", "elastic", "-n", namespace)
            assert deployment["spec"]["replicas"] == 2
            served = load.ok
            wait_for("the new replica to serve too", lambda: load.ok >= served + 8, timeout=60)
        finally:
            load.end()

        # Idle: the count comes back to one and that replica parks (standby, not zero).
        idle = wait_for(
            "one replica, parked",
            lambda: (
                (s := status(cluster, namespace)).get("desiredReplicas") == 1
                and s.get("replicas") == 1
                and s.get("standbyReplicas") == 1
                and s
            ),
            timeout=120,
        )
        assert idle["readyReplicas"] == 1, "a parked replica still takes requests (it wakes)"

        # The next burst wakes it through the Service; nothing failed on the whole way.
        burst = Load(url, streams=2)
        try:
            wait_for("the burst to be served", lambda: burst.ok >= 6, timeout=120)
            woken = wait_for(
                "the replica active again",
                lambda: (s := status(cluster, namespace)).get("standbyReplicas") == 0 and s,
                timeout=60,
            )
            assert woken["readyReplicas"] >= 1
        finally:
            burst.end()
    assert not load.failures and not burst.failures, (load.failures + burst.failures)[:3]
    assert load.ok + burst.ok >= 20
