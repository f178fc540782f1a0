"""Autoscaling against the real control plane: an HPA scaling an InferenceService through its
scale subresource (``mode: external``), and Berth's own loop scaling kwok pods on concurrency
it reads from a Prometheus-compatible query API on loopback that the test drives
(``mode: berth``). The Prometheus source itself is tested against a real Prometheus in
tests/operator/test_autoscale_sources.py; here the point is the operator's loop and the API."""

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from berth.cluster.cluster import LocalCluster
from berth.e2e.driven_prometheus import DrivenPrometheus
from berth.e2e.operator_fixtures import (
    OperatorProcess,
    apply_docs,
    berth_pods,
    condition,
    get_json,
    namespace,
    operator,
    service_manifest,
    wait_for,
)

pytestmark = pytest.mark.e2e
__all__ = ["namespace", "operator"]  # fixtures


@pytest.fixture
def prometheus() -> Iterator[DrivenPrometheus]:
    driven = DrivenPrometheus()
    yield driven
    driven.close()


def ready_pod_names(cluster: LocalCluster, namespace: str) -> list[str]:
    return [
        p["metadata"]["name"]
        for p in berth_pods(cluster, namespace)
        if condition(p, "Ready").get("status") == "True"
    ]


def test_an_hpa_scales_an_external_mode_service_through_its_scale_subresource(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str
) -> None:
    service = service_manifest(
        "hpa", namespace, 0.25, replicas=1, maxReplicas=3, autoscaling={"mode": "external"}
    )
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "hpa", "namespace": namespace},
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "berth.dev/v1alpha1", "kind": "InferenceService", "name": "hpa"
            },
            "minReplicas": 1,
            "maxReplicas": 3,
            "metrics": [{"type": "Resource", "resource": {
                "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 60}}}],
        },
    }  # fmt: skip
    apply_docs(cluster, [service, hpa])
    wait_for(
        "hpa's status selector (the scale subresource's labelSelectorPath)",
        lambda: (
            get_json(cluster, "inferenceservice", "hpa", "-n", namespace).get("status") or {}
        ).get("selector"),
    )

    def read_scale() -> dict[str, Any] | None:
        status = get_json(cluster, "hpa", "hpa", "-n", namespace).get("status") or {}
        able = condition({"status": status}, "AbleToScale")
        if status.get("currentReplicas") == 1 and able.get("status") == "True":
            return status
        return None

    status = wait_for("the HPA controller to read the scale subresource", read_scale, timeout=90)
    assert condition({"status": status}, "AbleToScale")["reason"] == "SucceededGetScale"
    # No metrics server here: the HPA says so and leaves the count alone; so does Berth.
    live = get_json(cluster, "inferenceservice", "hpa", "-n", namespace)
    assert live["spec"]["replicas"] == 1
    assert "lastDecision" not in (live.get("status") or {})
    scale = json.loads(
        cluster.kubectl("get", "--raw",
                        f"/apis/berth.dev/v1alpha1/namespaces/{namespace}/inferenceservices/hpa/scale")
    )  # fmt: skip
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 1


def test_berth_scales_up_on_concurrency_holds_without_metrics_and_parks_when_idle(
    cluster: LocalCluster,
    operator: OperatorProcess,
    namespace: str,
    prometheus: DrivenPrometheus,
) -> None:
    autoscaling = {
        "targetConcurrency": 2,
        "stableWindowSeconds": 12,
        "panicWindowSeconds": 6,
        "scaleDownDelaySeconds": 0,  # so that only missing metrics can hold the count
        "metrics": "Prometheus",
        "prometheusUrl": prometheus.url,
    }
    service = service_manifest(
        "scaled",
        namespace,
        0.125,
        replicas=1,
        maxReplicas=4,
        autoscaling=autoscaling,
        standby={"idleSeconds": 30},
    )
    apply_docs(cluster, [service])
    first = wait_for("scaled's first pod ready", lambda: ready_pod_names(cluster, namespace))
    prometheus.in_flight = {first[0]: 12.0}  # 12 in flight for 1.4 per replica: far over

    def spec_replicas() -> int:
        return int(
            get_json(cluster, "inferenceservice", "scaled", "-n", namespace)["spec"]["replicas"]
        )

    wait_for(
        "the autoscaler to scale scaled to maxReplicas", lambda: spec_replicas() == 4, timeout=60
    )
    wait_for(
        "the Deployment rendered with 4 replicas",
        lambda: get_json(cluster, "deployment", "scaled", "-n", namespace)["spec"]["replicas"] == 4,
        timeout=60,
    )
    status = wait_for(  # 12 in flight keep all four resident (2 each) once the 6 s window fills
        "the autoscaler's status",
        lambda: (
            (s := get_json(cluster, "inferenceservice", "scaled", "-n", namespace)["status"]).get(
                "desiredReplicas"
            )
            == 4
            == s.get("activeReplicas")
            and s
        ),
    )
    assert status["lastDecision"]["reason"] in ("Panic", "ScaledUp")
    assert status["lastScaleTime"] and status["activeReplicas"] == 4
    assert status["conditions"]  # the status board's fields survive the loop's merge patches
    assert any('pod=~"scaled-' in q and q.endswith("[30s]") for q in prometheus.queries)

    # Every pod busy, then Prometheus goes away: the count holds and the status says why.
    wait_for("4 ready pods", lambda: len(ready_pod_names(cluster, namespace)) == 4, timeout=60)
    prometheus.in_flight = dict.fromkeys(ready_pod_names(cluster, namespace), 0.0)
    prometheus.down = True
    held = wait_for(
        "a MetricsStale decision",
        lambda: (d := get_json(cluster, "inferenceservice", "scaled", "-n", namespace)["status"]
                 ["lastDecision"])["reason"] == "MetricsStale" and d,
        timeout=60,
    )  # fmt: skip
    assert "holding 4 replica(s)" in held["message"]
    time.sleep(15)  # a stable window and more: still nothing removed
    assert spec_replicas() == 4
    events = cluster.kubectl(
        "get", "events", "-n", namespace, "--field-selector", "reason=MetricsStale,type=Warning",
        "-o", "name",
    )  # fmt: skip
    assert events.split(), "no MetricsStale warning event"
    scaling = wait_for(
        "the ScalingActive condition to say why the count holds",
        lambda: next((c for c in get_json(cluster, "inferenceservice", "scaled", "-n", namespace)
                      ["status"].get("conditions", []) if c["type"] == "ScalingActive"
                      and c["reason"] == "MetricsStale"), None),
        timeout=30,
    )  # fmt: skip
    assert scaling["status"] == "False", scaling

    # Prometheus back, nothing in flight: down to the one replica that standby keeps, parked.
    prometheus.down = False
    wait_for("scaled down to standby", lambda: spec_replicas() == 1, timeout=90)
    status = wait_for(
        "the ScaledToStandby decision",
        lambda: (s := get_json(cluster, "inferenceservice", "scaled", "-n", namespace)["status"])
        ["lastDecision"]["reason"] == "ScaledToStandby" and s,
        timeout=30,
    )  # fmt: skip
    assert (status["desiredReplicas"], status["activeReplicas"]) == (1, 0)
