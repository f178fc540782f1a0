"""Autoscaling on concurrency with real parts (ARCHITECTURE section 6, issue 21): runtime pods on
the real node serving the tiny model on the CPU, a real Prometheus scraping them (the operator's
only metric source here), and bounded closed-loop load through the Service's ClusterIP.

One service of one to two replicas (the real node has two GPUs, and two replicas of one service
never share a GPU): four clients scale it to two; down to one client, the surplus pod leaves the
Service's rotation and is parked by the autoscaler while the scale-down delay keeps it, then it
goes while that client keeps sending; idle, the last replica parks (scale to
standby, not to zero: the node agent's ledger and ``status.standbyReplicas`` say so, the
Deployment keeps it); four clients wake it and the count goes back up. Every request of the test
is counted and none may fail.
"""

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from berth import wire
from berth.agent_protocol import TenantState, TenantView
from berth.cluster.cluster import LocalCluster
from berth.cluster.realnode import AGENT_SOCKET
from berth.e2e.operator_fixtures import (
    OperatorProcess,
    apply_docs,
    berth_pods,
    get_json,
    wait_for,
)
from berth.e2e.prometheus import BINARY, QUERY_LOG, per_pod, running_prometheus
from berth.e2e.real_node import cluster_ip, post, real_service, routed_post, tenants
from berth.operator import autoscaler, render
from berth.runtime.server.agent_client import AgentClient

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.usefixtures("needs_real_node"),
    pytest.mark.skipif(BINARY is None, reason="Debian's prometheus package is not installed"),
]
NAME = "elastic"
BODY = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
MAX_REQUESTS = 5000  # per load: a bound if a phase outlasts its wait (the tiny model serves ~50/s)
AUTOSCALING = {
    # Two requests per replica: one closed-loop client (tens of requests a second, spread over
    # both pods) often reads as one in flight on each, the two pods being scraped at different
    # instants. At a target of one that kept the active count at two until the scale-down
    # removed the surplus before it could park (CI, 2026-12-07); it never reads as more than two.
    "targetConcurrency": 2,
    "targetUtilization": 1.0,
    "stableWindowSeconds": 6,  # the CRD's least
    "panicWindowSeconds": 2,
    "scaleDownDelaySeconds": 30,  # the surplus stays a while: out of the rotation and parked
    "metrics": "Prometheus",
}


class Load:
    """``clients`` closed-loop clients through the ClusterIP, each sending the next completion as
    soon as the last one ended (a new connection each, so kube-proxy spreads them), until
    ``end`` or ``MAX_REQUESTS`` in all. Counts what succeeded and keeps what failed."""

    def __init__(self, url: str, clients: int) -> None:
        self.url, self.stopping, self.counting = url, threading.Event(), threading.Lock()
        self.ok, self.failures = 0, list[str]()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def _client(self) -> None:
        while not self.stopping.is_set() and self.ok + len(self.failures) < MAX_REQUESTS:
            try:
                answer = post(self.url, BODY, timeout=120)
                assert answer["usage"]["completion_tokens"] == BODY["max_tokens"], answer
                with self.counting:
                    self.ok += 1
            except (urllib.error.URLError, OSError, AssertionError, KeyError) as error:
                with self.counting:
                    self.failures.append(repr(error))

    def end(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=150)
        assert not any(t.is_alive() for t in self.threads), "a client hung past its timeout"


@pytest.fixture
def loads() -> Iterator[list[Load]]:
    """The loads a test starts, stopped however it ends."""
    started: list[Load] = []
    yield started
    for load in started:
        load.stopping.set()


def status(cluster: LocalCluster, namespace: str) -> dict[str, Any]:
    found: dict[str, Any] = get_json(cluster, "bis", NAME, "-n", namespace).get("status") or {}
    return found


def deployment_replicas(cluster: LocalCluster, namespace: str) -> int:
    return int(get_json(cluster, "deployment", NAME, "-n", namespace)["spec"]["replicas"])


def ready_names(cluster: LocalCluster, namespace: str) -> set[str]:
    return {
        p["metadata"]["name"]
        for p in berth_pods(cluster, namespace)
        if any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in p["status"].get("conditions", [])
        )
    }


def routing_labels(cluster: LocalCluster, namespace: str) -> dict[str, str]:
    """Each pod's ``berth.dev/routed`` label (what the Service selects on)."""
    return {
        p["metadata"]["name"]: p["metadata"].get("labels", {}).get(wire.LABEL_ROUTED, "")
        for p in berth_pods(cluster, namespace)
    }


def closes_connections(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return bool(answer.headers.get("connection", "").lower() == "close")


def ledger(namespace: str) -> dict[str, TenantView]:
    """The node agent's tenants of ``namespace`` by pod name."""
    views = [t for g in AgentClient(str(AGENT_SOCKET)).ledger().gpus for t in g.tenants]
    prefix = f"{namespace}/"
    return {v.tenant.removeprefix(prefix): v for v in views if v.tenant.startswith(prefix)}


def test_real_pods_scale_up_under_load_down_while_serving_park_when_idle_and_wake(
    cluster: LocalCluster,
    operator: OperatorProcess,
    namespace: str,
    tiny_model: Path,
    tmp_path: Path,
    loads: list[Load],
) -> None:
    wait_for(
        "earlier tests' pods to leave the real node", lambda: not tenants(cluster), timeout=120
    )
    with running_prometheus(cluster, namespace, render.PORT, tmp_path) as prometheus:
        service = real_service(NAME, namespace, tiny_model, fraction=0.25, minReplicas=1,
                               maxReplicas=2, standby={"idleSeconds": 30},
                               autoscaling={**AUTOSCALING, "prometheusUrl": prometheus})  # fmt: skip
        apply_docs(cluster, [service])
        (first,) = wait_for("the first runtime pod Ready", lambda: ready_names(cluster, namespace),
                            timeout=240)  # fmt: skip
        url = f"http://{cluster_ip(cluster, NAME, namespace)}:{render.PORT}/v1/completions"
        routed_post(url, BODY)
        running = f'berth_requests_running{{namespace="{namespace}"}}'
        wait_for("Prometheus to scrape the runtime",
                 lambda: first in per_pod(prometheus, running), timeout=60)  # fmt: skip

        # Up: four clients on one replica targeted at two requests each; two is the most.
        loads.append(load := Load(url, clients=4))
        scaled = wait_for(
            "two replicas Ready under load",
            lambda: (s := status(cluster, namespace)).get("readyReplicas") == 2 and s,
            timeout=150,
        )
        assert scaled["desiredReplicas"] == 2 and deployment_replicas(cluster, namespace) == 2
        both = ready_names(cluster, namespace)
        successes = f'sum by (pod) (berth_request_success_total{{namespace="{namespace}"}})'
        wait_for(
            "the new replica to serve too (Prometheus' counts per pod)",
            lambda: set(per_pod(prometheus, successes)) >= both,
            timeout=60,
        )

        # Down while serving: one client keeps sending. The surplus pod leaves the Service's
        # rotation and the autoscaler parks it (its own idle timeout is far off) while the
        # scale-down delay keeps it; then the count drops, and the pod that goes is that one.
        loads.append(trickle := Load(url, clients=1))
        load.end()
        # The surplus is the pod out of the rotation that parked: the active count may still
        # rise and fall again on a burst of the one client (it falls only after 10 s without
        # a higher count), and then the pod that leaves need not be the first one.
        (surplus,) = wait_for(
            "one pod out of the rotation and parked in the node agent's ledger",
            lambda: [n for n, routed in routing_labels(cluster, namespace).items()
                     if routed == "false" and (v := ledger(namespace).get(n))
                     and v.state == TenantState.PARKED],
            timeout=90,
        )  # fmt: skip
        log = cluster.kubectl("logs", "-n", namespace, surplus)
        assert 'POST /admin/rotation HTTP/1.1" 200' in log, "the loop did not tell it"
        assert 'POST /admin/park HTTP/1.1" 200' in log
        assert deployment_replicas(cluster, namespace) == 2, "the delay still keeps it"
        ip = get_json(cluster, "pod", surplus, "-n", namespace)["status"]["podIP"]
        wait_for(  # so keep-alive clients pinned to it reconnect through the Service
            "the surplus to close connections after each response (the loop told it)",
            lambda: closes_connections(f"http://{ip}:{render.PORT}/health"),
            timeout=90,
        )
        served = trickle.ok
        wait_for("the client served while the surplus is parked",
                 lambda: trickle.ok >= served + 3, timeout=60)  # fmt: skip
        assert ledger(namespace)[surplus].state == TenantState.PARKED, "a request reached it"
        wait_for(
            "the count back to one",
            lambda: (
                status(cluster, namespace).get("desiredReplicas") == 1
                and deployment_replicas(cluster, namespace) == 1
            ),
            timeout=60,
        )
        wait_for(
            "the surplus pod drained and gone",
            lambda: len(get_json(cluster, "pods", "-n", namespace)["items"]) == 1,
            timeout=90,
        )
        before = trickle.ok
        wait_for("the client served after the scale-down", lambda: trickle.ok >= before + 3,
                 timeout=60)  # fmt: skip
        trickle.end()

        # Idle: the last replica parks; the Deployment keeps it (standby, not zero).
        (last,) = ready_names(cluster, namespace)
        assert last != surplus, "the scale-down removed the routed pod, not the parked one"
        view = wait_for(
            "the last replica parked in the node agent's ledger",
            lambda: (v := ledger(namespace).get(last)) and v.state == TenantState.PARKED and v,
            timeout=60,
        )
        assert view.held_bytes == 0 and ledger(namespace).keys() == {last}, ledger(namespace)
        # The decision parks it (its own idle timeout, 30 s, is far off): the active count
        # falls only after 10 s without demand.
        idle = wait_for(
            "status.standbyReplicas to count it and the decision to want none active",
            lambda: (
                (s := status(cluster, namespace)).get("standbyReplicas") == 1
                and (s["desiredReplicas"], s["activeReplicas"]) == (1, 0)
                and s
            ),
            timeout=45,
        )
        assert idle["readyReplicas"] == 1, "a parked replica still takes requests (it wakes)"
        assert idle["lastDecision"]["reason"] == autoscaler.TO_STANDBY, idle["lastDecision"]
        assert deployment_replicas(cluster, namespace) == 1

        # Load returns: the requests wake the parked replica, and the count goes back up.
        loads.append(burst := Load(url, clients=4))
        wait_for(
            "the parked replica active again",
            lambda: (
                (v := ledger(namespace).get(last))
                and v.state == TenantState.ACTIVE
                and v.held_bytes > 0
            ),
            timeout=60,
            every=0.5,
        )
        wait_for("status.standbyReplicas back to 0",
                 lambda: status(cluster, namespace).get("standbyReplicas") == 0, timeout=30)  # fmt: skip
        wait_for("two replicas wanted again",
                 lambda: status(cluster, namespace).get("desiredReplicas") == 2, timeout=60)  # fmt: skip
        wait_for("the burst to be served", lambda: burst.ok >= 8, timeout=60)
        burst.end()
        queries = (tmp_path / QUERY_LOG).read_text().splitlines()

    reasons = {
        e["reason"]
        for e in get_json(cluster, "events", "-n", namespace)["items"]
        if e["involvedObject"]["kind"] == "InferenceService"
    }
    assert {autoscaler.SCALED_DOWN, autoscaler.TO_STANDBY} <= reasons, reasons
    assert reasons & {autoscaler.SCALED_UP, autoscaler.PANIC}, reasons
    asked = [json.loads(line)["params"]["query"] for line in queries]
    assert any(f'pod=~"{NAME}-' in q and f'namespace="{namespace}"' in q for q in asked), asked[:3]
    failures = [f for each in loads for f in each.failures]
    assert not failures, f"{len(failures)} of the requests failed: {failures[:3]}"
    served = 1 + sum(each.ok for each in loads)
    print(f"{served} requests served, none failed; loads {[each.ok for each in loads]}")
    assert served >= 30, f"only {served} requests served"
