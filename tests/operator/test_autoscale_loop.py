"""The autoscaler's shell, one tick at a time: real runtime metrics on loopback, a fake API client
that records the scale, status and event writes (the real API server is e2e/test_autoscaling.py)."""

import asyncio
import base64
import copy
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from metrics_harness import runtime_registry, runtime_stubs, serving

from berth import wire
from berth.e2e.driven_prometheus import DrivenPrometheus
from berth.operator import api, autoscaler
from berth.operator.autoscale_loop import (
    DRAIN_S,
    ServiceAutoscaler,
    berth_mode,
    ready_pods,
    status_patch,
)
from berth.operator.kube import Obj
from berth.operator.routing import DELETION_COST

INVOLVED = {
    "apiVersion": f"{wire.GROUP}/{wire.VERSION}",
    "kind": "InferenceService",
    "metadata": {"name": "llama", "namespace": "ml", "uid": "u-1"},
}
BASE = "/apis/berth.dev/v1alpha1/namespaces/ml/inferenceservices/llama"
TOKEN = "s3cret"


def pod(name: str, port: int, ready: bool = True, ip: str = "127.0.0.1", **meta: Any) -> Obj:
    return {
        "metadata": {"name": name, **meta},
        "spec": {"containers": [{"ports": [{"name": "http", "containerPort": port}]}]},
        "status": {
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


class FakeClient:
    """Serves a pod list and the admin Secret; records merge patches (and makes those of pods)
    and posted events."""

    def __init__(self, pods: list[Obj]) -> None:
        self.pods = pods
        self.patches: list[tuple[str, Obj]] = []
        self.events: list[Obj] = []

    def get(self, path: str, **params: str) -> Obj:
        if path == "/api/v1/namespaces/ml/secrets/llama-berth-admin":
            return {"data": {"token": base64.b64encode(TOKEN.encode()).decode()}}
        assert path == "/api/v1/namespaces/ml/pods"
        unrouted = f"{wire.LABEL_SERVICE}=llama,{wire.LABEL_ROUTED}!=true"
        if params == {"labelSelector": unrouted}:  # as the API server selects: unset counts
            return {"items": [copy.deepcopy(p) for p in self.pods
                              if p["metadata"].get("labels", {}).get(wire.LABEL_ROUTED) != "true"]}  # fmt: skip
        assert params == {"labelSelector": f"{wire.LABEL_SERVICE}=llama", "resourceVersion": "0"}
        return {"items": copy.deepcopy(self.pods)}

    def merge_patch(self, path: str, body: Obj) -> None:
        self.patches.append((path, body))
        if path.startswith("/api/v1/namespaces/ml/pods/"):
            (pod,) = [p for p in self.pods if p["metadata"]["name"] == path.rsplit("/", 1)[1]]
            for key in ("labels", "annotations"):
                merged = {**pod["metadata"].get(key, {}), **body["metadata"][key]}
                pod["metadata"][key] = {k: v for k, v in merged.items() if v is not None}

    def post(self, path: str, body: Obj) -> None:
        self.events.append(body)


def spec(replicas: int, **autoscaling: Any) -> api.InferenceServiceSpec:
    return api.InferenceServiceSpec.model_validate(
        {"model": {"source": {"hostPath": {"path": "/m"}}}, "gpu": {"fraction": 0.5},
         "replicas": replicas, "maxReplicas": 20, "standby": {},
         "autoscaling": {"targetConcurrency": 2, **autoscaling}}
    )  # fmt: skip


@pytest.fixture
def busy() -> Iterator[list[Obj]]:
    """Two ready runtimes with 8 and 6 requests in flight, and one pod not ready yet."""
    with serving((5, 3, "active"), (6, 0, "active")) as ports:
        pods = [pod(f"llama-x-{i}", port) for i, port in enumerate(ports)]
        yield [*pods, pod("llama-x-9", 1, ready=False)]


def run_ticks(client: FakeClient, ticks: list[tuple[api.InferenceServiceSpec, float]]) -> list[Any]:
    async def go() -> list[Any]:
        async with httpx.AsyncClient() as http:
            scaler = ServiceAutoscaler(client, http, INVOLVED)  # type: ignore[arg-type]
            return [await scaler.tick(s, now) for s, now in ticks]

    return asyncio.run(go())


def test_only_ready_pods_with_an_ip_are_read_on_their_http_port() -> None:
    pods = [
        pod("a", 8000),
        pod("b", 9000, ip="10.0.0.2"),
        pod("c", 8000, ready=False),
        pod("d", 8000, deletionTimestamp="2026-12-05T00:00:00Z"),
        {
            "metadata": {"name": "e"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        },
    ]
    assert [(t.name, t.url) for t in ready_pods(pods)] == [
        ("a", "http://127.0.0.1:8000/metrics"),
        ("b", "http://10.0.0.2:9000/metrics"),
    ]


def test_the_loop_runs_only_in_berth_mode() -> None:
    assert berth_mode({"autoscaling": {}}) and berth_mode({"autoscaling": {"mode": "berth"}})  # type: ignore[arg-type]
    assert not berth_mode({"autoscaling": {"mode": "external"}})  # type: ignore[arg-type]
    assert not berth_mode({})  # type: ignore[arg-type]


def test_demand_scales_through_the_scale_subresource_and_reports_once(busy: list[Obj]) -> None:
    client = FakeClient(busy)
    # 14 in flight at 1.4 per replica: the panic window asks for 10 (the rate limit of 10 x 1).
    first, again = run_ticks(client, [(spec(1), 1000.0), (spec(1), 1002.0)])
    assert first.replicas == 10 and first.reason == autoscaler.PANIC
    scales = [body for path, body in client.patches if path == f"{BASE}/scale"]
    assert scales == [{"spec": {"replicas": 10}}]  # the second tick knows its scale is coming
    statuses = [body for path, body in client.patches if path == f"{BASE}/status"]
    assert set(statuses[0]["status"]) == {
        "desiredReplicas", "activeReplicas", "lastDecision", "lastScaleTime"
    }  # fmt: skip
    assert statuses[0]["status"]["lastDecision"]["reason"] == "Panic"
    assert len(statuses) == len(client.events) == 1  # nothing changed on the second tick
    event = client.events[0]
    assert (event["type"], event["reason"], event["involvedObject"]["uid"]) == (
        "Normal", "Panic", "u-1"
    )  # fmt: skip
    assert again.replicas == 10


def test_runtimes_that_stop_answering_hold_the_count_with_a_warning(busy: list[Obj]) -> None:
    client = FakeClient(busy)
    for p in busy:  # the pods' metrics ports now refuse connections
        p["spec"]["containers"][0]["ports"][0]["containerPort"] = 1
    ticks = [(spec(4), 1000.0 + 2 * i) for i in range(40)]
    decisions = run_ticks(client, ticks)
    assert all(d.replicas == 4 for d in decisions)
    assert decisions[-1].held
    assert not [path for path, _ in client.patches if path.endswith("/scale")]
    assert client.events[-1]["type"] == "Warning"
    assert client.events[-1]["reason"] in autoscaler.HELD


def test_a_status_patch_names_the_scale_time_only_when_it_scaled() -> None:
    decision = autoscaler.Decision(3, 1, "ScaledUp", "m", autoscaler.State(3))
    assert "lastScaleTime" in status_patch(decision, "t", scaled=True)["status"]
    steady = status_patch(decision, "t", scaled=False)["status"]
    assert "lastScaleTime" not in steady and steady["activeReplicas"] == 1


def test_through_prometheus_up_held_while_it_is_down_then_parked_when_idle() -> None:
    """The e2e test's sequence, tick by tick on a fake clock: demand scales up, Prometheus going
    away holds the count (MetricsStale), its return with nothing in flight scales to standby."""
    clock = [1000.0]
    prometheus = DrivenPrometheus(clock=lambda: clock[0])
    names = [f"llama-x-{i}" for i in range(4)]
    client = FakeClient([pod(n, 8000, ip="10.0.0.1") for n in names[:1]])
    autoscaling = {
        "stableWindowSeconds": 12,
        "scaleDownDelaySeconds": 0,
        "metrics": "Prometheus",
        "prometheusUrl": prometheus.url,
    }
    seen: list[autoscaler.Decision] = []

    async def go() -> None:
        async with httpx.AsyncClient() as http:
            scaler = ServiceAutoscaler(client, http, INVOLVED)  # type: ignore[arg-type]
            replicas = 1
            for step in range(60):
                clock[0] = 1000.0 + 2 * step
                if step == 5:
                    prometheus.in_flight = {names[0]: 12.0}
                if step == 15:  # four pods ready and idle, then Prometheus goes away
                    client.pods = [pod(n, 8000, ip="10.0.0.1") for n in names]
                    prometheus.in_flight = dict.fromkeys(names, 0.0)
                    prometheus.down = True
                if step == 30:
                    prometheus.down = False
                decision = await scaler.tick(spec(replicas, **autoscaling), clock[0])
                replicas = decision.replicas  # the watch shows the scale at once
                if step >= 15:  # and the Deployment removes pods at once
                    client.pods = client.pods[:replicas]
                seen.append(decision)

    try:
        asyncio.run(go())
    finally:
        prometheus.close()
    assert max(d.replicas for d in seen[5:15]) == 9  # 12 in flight at 1.4 per replica
    assert {d.reason for d in seen[21:30]} == {autoscaler.METRICS_STALE}
    assert all(d.replicas == seen[14].replicas for d in seen[15:30])
    assert seen[-1].replicas == 1 and seen[-1].active == 0
    assert seen[-1].reason == autoscaler.TO_STANDBY
    assert any('pod=~"llama-' in q for q in prometheus.queries)


def test_surplus_leaves_the_rotation_parks_after_the_drain_and_wakes_when_demand_returns() -> None:
    """Three routed replicas, one request in flight: once the window is covered the two idle
    ones leave the Service's rotation (label and deletion cost) before the scale-down, are asked
    to park after the drain time with the Secret's token, and are routed and woken when demand
    comes back; each move of the label is also told to the pod (``POST /admin/rotation``)."""
    with runtime_stubs((1, 0, "active"), (0, 0, "active"), (0, 0, "active")) as stubs:
        names = [f"llama-x-{i}" for i in range(3)]
        routed = {"labels": {wire.LABEL_ROUTED: "true"}}
        client = FakeClient(
            [pod(n, s.server_port, **routed) for n, s in zip(names, stubs, strict=True)]
        )
        autoscaling = {"stableWindowSeconds": 6, "scaleDownDelaySeconds": 0}

        def labels() -> dict[str, str]:
            return {p["metadata"]["name"]: p["metadata"]["labels"][wire.LABEL_ROUTED]
                    for p in client.pods}  # fmt: skip

        async def go() -> list[autoscaler.Decision]:
            nonlocal left, parked_at
            seen = []
            async with httpx.AsyncClient() as http:
                scaler = ServiceAutoscaler(client, http, INVOLVED)  # type: ignore[arg-type]
                replicas = 3
                for step in range(20):
                    now = 1000.0 + 2 * step
                    if step == 12:  # parked now, and demand for five
                        for stub in stubs[1:]:
                            stub.registry = runtime_registry(0, 0, "standby")
                        stubs[0].registry = runtime_registry(7, 0, "active")
                    decision = await scaler.tick(spec(replicas, **autoscaling), now)
                    replicas = decision.replicas
                    seen.append(decision)
                    if left is None and labels() == dict(
                        zip(names, ["true", "false", "false"], strict=True)
                    ):
                        left = now
                        scale = [i for i, (p, _) in enumerate(client.patches) if "scale" in p]
                        unroute = [i for i, (p, _) in enumerate(client.patches) if "/pods/" in p]
                        assert unroute and scale and max(unroute) < min(scale)
                    if parked_at is None and stubs[1].admin_calls:
                        parked_at = now
            return seen

        left: float | None = None
        parked_at: float | None = None
        seen = asyncio.run(go())
        assert left is not None and parked_at is not None and parked_at - left >= DRAIN_S
        parks = [s.admin_calls for s in stubs]
        assert parks[0] == []
        # The stubs do not change state when asked, so each ask is repeated once, 10 s later.
        expected = [("/admin/park", TOKEN)] * 2 + [("/admin/wake", TOKEN)] * 2
        assert parks[1] == parks[2] == expected
        # Each move of the label is told to the pod at once, with the token.
        told = [s.rotation_calls for s in stubs]
        assert told[0] == [] and told[1] == told[2] == [(False, TOKEN), (True, TOKEN)]
        assert labels() == dict.fromkeys(names, "true")
        assert seen[-1].active >= 3
        unrouted = next(b for p, b in client.patches if p.endswith("llama-x-1"))
        assert unrouted["metadata"]["annotations"][DELETION_COST] == "-1"


def test_the_last_replica_parks_once_nothing_is_in_flight_and_stays_in_the_rotation() -> None:
    """Scale to standby is real: once the window is covered and nothing was in flight over the
    panic window, the one routed replica is asked to park (not left to its own idle timeout),
    keeps its label so that a request can reach and wake it, and is not asked again once its
    metrics say it is parked."""
    with runtime_stubs((1, 0, "active")) as stubs:
        routed = {"labels": {wire.LABEL_ROUTED: "true"}}
        client = FakeClient([pod("llama-x-0", stubs[0].server_port, **routed)])
        autoscaling = {"stableWindowSeconds": 6, "scaleDownDelaySeconds": 0}

        async def go() -> list[autoscaler.Decision]:
            seen = []
            async with httpx.AsyncClient() as http:
                scaler = ServiceAutoscaler(client, http, INVOLVED)  # type: ignore[arg-type]
                for step in range(16):
                    if step == 3:  # the request ends
                        stubs[0].registry = runtime_registry(0, 0, "active")
                    if stubs[0].admin_calls:  # the runtime parks when asked
                        stubs[0].registry = runtime_registry(0, 0, "standby")
                    seen.append(await scaler.tick(spec(1, **autoscaling), 1000.0 + 2 * step))
            return seen

        seen = asyncio.run(go())
        assert [d.active for d in seen[:3]] == [1, 1, 1]
        assert seen[-1].replicas == 1 and seen[-1].active == 0
        assert seen[-1].reason == autoscaler.TO_STANDBY
        assert stubs[0].admin_calls == [("/admin/park", TOKEN)]
        assert client.pods[0]["metadata"]["labels"][wire.LABEL_ROUTED] == "true"
        assert not [p for p, _ in client.patches if "/pods/" in p]


def test_leaving_berth_mode_routes_every_pod_again() -> None:
    out = {"labels": {wire.LABEL_ROUTED: "false"}, "annotations": {wire.POD_UNROUTED_AT: "1.0"}}
    client = FakeClient([pod("llama-x-0", 1, labels={wire.LABEL_ROUTED: "true"}),
                         pod("llama-x-1", 1, **out), pod("llama-x-2", 1, ready=False, **out)])  # fmt: skip

    async def go() -> None:
        async with httpx.AsyncClient() as http:
            await ServiceAutoscaler(client, http, INVOLVED).put_all_back()  # type: ignore[arg-type]

    asyncio.run(go())
    assert [p for p, _ in client.patches] == [
        "/api/v1/namespaces/ml/pods/llama-x-1",
        "/api/v1/namespaces/ml/pods/llama-x-2",
    ]
    assert all(p["metadata"]["labels"][wire.LABEL_ROUTED] == "true" for p in client.pods)
    assert all(wire.POD_UNROUTED_AT not in p["metadata"]["annotations"] for p in client.pods[1:])


def test_without_standby_pods_are_routed_back_but_not_told() -> None:
    """Without standby a pod's admin endpoints are closed (no token in its environment): a pod
    found out of the rotation is routed again by its label alone, and nothing is posted."""
    with runtime_stubs((1, 0, "active"), (0, 0, "active")) as stubs:
        labels = [{wire.LABEL_ROUTED: "true"}, {wire.LABEL_ROUTED: "false"}]
        client = FakeClient(
            [pod(f"llama-x-{i}", s.server_port, labels=labels[i]) for i, s in enumerate(stubs)]
        )
        plain = spec(2).model_copy(update={"standby": None})
        run_ticks(client, [(plain, 1000.0), (plain, 1002.0)])
        assert [p["metadata"]["labels"][wire.LABEL_ROUTED] for p in client.pods] == ["true"] * 2
        assert [s.rotation_calls for s in stubs] == [[], []]
        assert [s.admin_calls for s in stubs] == [[], []]
