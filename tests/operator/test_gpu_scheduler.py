"""The GPU scheduler's shell, driven through its reflector callbacks with a fake API server.

The races of issue 19 are reproduced deterministically: a list taken before a bind and handled
after it, a Binding call that times out although it landed, a malformed pod between good ones,
and pods that no InferenceService owns. The fake answers the calls the scheduler makes (get,
post, create, delete, patch) from a dict of objects and records every Binding; the same shell is
run against the real API server in e2e/test_scheduler_reliability.py.
"""

import copy
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from berth import wire
from berth.operator.health import Health
from berth.operator.kube import KubeError, Obj, reflect
from berth.operator.reservations import ANNOTATION_GPU_INDEX, LABEL_RESERVATION
from berth.operator.scheduler import GpuScheduler
from berth.operator.settings import OperatorSettings

GIB = 2**30
MIB = 2**20
CAP_MIB = 81920  # an 80 GiB GPU
SERVICE_API = f"{wire.GROUP}/{wire.VERSION}"


class FakeApi:
    """Objects by path; Bindings recorded (and applied to the stored pod, like the API server)."""

    def __init__(self) -> None:
        self.objects: dict[str, Obj] = {}
        self.bindings: list[Obj] = []
        self.events: list[Obj] = []
        self.created: list[Obj] = []
        self.deleted: list[str] = []
        self.lock = threading.Lock()
        self.bind_error: Exception | None = None  # raised after the bind landed, when set
        self.refuse_binds: KubeError | None = None  # raised instead of binding, when set
        self.names = 0

    def get(self, path: str, **params: str) -> Obj:
        with self.lock:
            if path not in self.objects:
                raise KubeError(404, "NotFound", path)
            return copy.deepcopy(self.objects[path])

    def post(self, path: str, body: Obj) -> None:
        with self.lock:
            if path.endswith("/events"):
                self.events.append(body)
                return
            if path.endswith("/binding"):
                if self.refuse_binds:
                    raise self.refuse_binds
                stored = self.objects.get(path.removesuffix("/binding"))
                if stored is not None:
                    if stored["spec"].get("nodeName"):
                        raise KubeError(409, "Conflict", "pod is already assigned to a node")
                    stored["spec"]["nodeName"] = body["target"]["name"]
                    stored["metadata"]["annotations"].update(body["metadata"]["annotations"])
                self.bindings.append(body)
            error = self.bind_error
        if error is not None and path.endswith("/binding"):
            raise error

    def create(self, path: str, body: Obj) -> Obj:
        with self.lock:
            self.names += 1
            obj = copy.deepcopy(body)
            obj["metadata"]["name"] = body["metadata"]["generateName"] + str(self.names)
            self.created.append(obj)
            self.objects[f"{path}/{obj['metadata']['name']}"] = obj
            return obj

    def delete(self, path: str, grace_period_s: int | None = None) -> None:
        with self.lock:
            self.deleted.append(path)
            self.objects.pop(path, None)

    def strategic_patch(self, path: str, body: Obj) -> None:
        pass

    def booked(self) -> dict[tuple[str, int], int]:
        """(node, GPU) -> bytes bound there, from the recorded Bindings."""
        out: dict[tuple[str, int], int] = {}
        for b in self.bindings:
            a = b["metadata"]["annotations"]
            key = (b["target"]["name"], int(a[wire.POD_GPU_INDEX]))
            out[key] = out.get(key, 0) + int(a[wire.POD_GPU_MEMORY_REQUEST])
        return out


def node(name: str, gpus: int = 1, **allocatable: str) -> Obj:
    return {
        "metadata": {"name": name, "labels": {wire.NODE_GPU_MEMORY_MIB: str(CAP_MIB)}},
        "status": {
            "allocatable": {wire.GPU_RESOURCE: str(gpus), **allocatable},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def requesting(pod: Obj, cpu: str, node: str | None = None) -> Obj:
    """``pod`` with one container asking ``cpu``, bound to ``node`` if given."""
    pod["spec"]["containers"] = [{"name": "c", "resources": {"requests": {"cpu": cpu}}}]
    if node:
        pod["spec"]["nodeName"] = node
    return pod


def owned_pod(api: FakeApi, name: str, fraction: float, namespace: str = "team") -> Obj:
    """A pod as the Deployment controller makes it, with its ReplicaSet, Deployment and
    InferenceService in the fake API server."""
    service = name.rsplit("-", 1)[0]
    api.objects[f"/apis/{SERVICE_API}/namespaces/{namespace}/inferenceservices/{service}"] = {
        "metadata": {"name": service, "namespace": namespace, "uid": f"is-{service}"}
    }
    api.objects[f"/apis/apps/v1/namespaces/{namespace}/deployments/{service}"] = {
        "metadata": {"name": service, "namespace": namespace, "uid": f"d-{service}",
                     "ownerReferences": [{"apiVersion": SERVICE_API, "kind": "InferenceService",
                                          "name": service, "uid": f"is-{service}", "controller": True}]}
    }  # fmt: skip
    api.objects[f"/apis/apps/v1/namespaces/{namespace}/replicasets/{service}-rs"] = {
        "metadata": {"name": f"{service}-rs", "namespace": namespace, "uid": f"rs-{service}",
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                          "name": service, "uid": f"d-{service}", "controller": True}]}
    }  # fmt: skip
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name, "namespace": namespace, "uid": f"uid-{name}",
            "labels": {wire.LABEL_SERVICE: service},
            "annotations": {wire.POD_WANTS_GPU_FRACTION: repr(fraction)},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{service}-rs",
                                 "uid": f"rs-{service}", "controller": True}],
        },
        "spec": {"schedulerName": wire.SCHEDULER_NAME},
        "status": {"phase": "Pending"},
    }  # fmt: skip


def bound(pod: Obj, binding: Obj) -> Obj:
    """The pod as the API server shows it after ``binding``."""
    out = copy.deepcopy(pod)
    out["spec"]["nodeName"] = binding["target"]["name"]
    out["metadata"]["annotations"].update(binding["metadata"]["annotations"])
    return out


@pytest.fixture
def api() -> FakeApi:
    return FakeApi()


@pytest.fixture
def scheduler(api: FakeApi) -> Iterator[GpuScheduler]:
    settings = OperatorSettings(bind_workers=1, batch_window_s=0, assume_ttl_s=30.0)
    s = GpuScheduler(api, settings)  # type: ignore[arg-type]
    s.reporter.shutdown()
    s.reporter = ThreadPoolExecutor(1)  # FIFO: waiting for a no-op waits for every report
    s._nodes_listed([node("n0")])
    s._reservations_listed([])
    s._pods_listed([])
    s._node_pods_listed([])
    yield s
    s.shutdown()


def drain(s: GpuScheduler) -> None:
    """Wait until every bind submitted so far has run (one bind worker, FIFO)."""
    s.bind_pool.submit(lambda: None).result(timeout=10)


def test_a_stale_relist_after_a_bind_does_not_book_the_gpu_twice(
    api: FakeApi, scheduler: GpuScheduler
) -> None:
    a = owned_pod(api, "a-0", 0.55)  # 44 GiB
    scheduler._pod_event("ADDED", a)
    stale_list = [copy.deepcopy(a)]  # taken now, before the bind; handled after it
    scheduler.schedule_once()
    drain(scheduler)
    assert len(api.bindings) == 1
    scheduler._pods_listed(stale_list)  # still shows a-0 unbound
    scheduler._pod_event("ADDED", owned_pod(api, "b-0", 1.0))  # 80 GiB
    scheduler.schedule_once()
    drain(scheduler)
    assert [b["metadata"]["name"] for b in api.bindings] == ["a-0"]
    assert all(v <= CAP_MIB * MIB for v in api.booked().values()), api.booked()
    assert "b-0" in str(scheduler.unschedulable)
    # The watch then confirms a-0: still one booking, no longer assumed.
    scheduler._pod_event("MODIFIED", bound(a, api.bindings[0]))
    assert not scheduler.ledger.assumed and scheduler.ledger.tenants[("n0", 0)] == 1


def test_a_bind_that_timed_out_but_landed_keeps_its_share(
    api: FakeApi, scheduler: GpuScheduler
) -> None:
    api.bind_error = httpx.ReadTimeout("timed out")
    scheduler._pod_event("ADDED", owned_pod(api, "a-0", 0.55))
    scheduler.schedule_once()
    drain(scheduler)
    api.bind_error = None
    scheduler._pod_event("ADDED", owned_pod(api, "b-0", 1.0))
    scheduler.schedule_once()
    drain(scheduler)
    assert [b["metadata"]["name"] for b in api.bindings] == ["a-0"]
    assert scheduler.ledger.is_assumed("team/a-0") and "team/a-0" not in scheduler.pending
    assert scheduler.metrics.bind_failures.labels("ambiguous")._value.get() == 1


def stored(api: FakeApi, pod: Obj) -> Obj:
    """Keep ``pod`` in the fake API server (GETs and Bindings then see it)."""
    meta = pod["metadata"]
    api.objects[f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}"] = copy.deepcopy(pod)
    return pod


def recheck_due(s: GpuScheduler) -> None:
    with s.lock:
        s._check_due()
    s.reporter.submit(lambda: None).result(timeout=10)


def test_an_unconfirmed_bind_that_never_landed_is_freed_after_its_deadline_and_placed_again(
    api: FakeApi, scheduler: GpuScheduler
) -> None:
    api.refuse_binds = KubeError(503, "ServiceUnavailable", "etcd leader changed")
    scheduler.settings = OperatorSettings(bind_workers=1, batch_window_s=0, assume_ttl_s=0.0)
    scheduler._pod_event("ADDED", stored(api, owned_pod(api, "a-0", 0.5)))
    scheduler.schedule_once()
    drain(scheduler)
    assert scheduler.ledger.is_assumed("team/a-0")
    recheck_due(scheduler)  # a fresh GET shows it unbound
    assert not scheduler.ledger.used_gpus() and "team/a-0" in scheduler.pending
    assert scheduler.metrics.expired._value.get() == 1
    api.refuse_binds = None
    scheduler.schedule_once()
    drain(scheduler)
    assert [b["metadata"]["name"] for b in api.bindings] == ["a-0"]


def test_past_its_deadline_a_bind_that_landed_is_confirmed_by_a_read_not_freed(
    api: FakeApi, scheduler: GpuScheduler
) -> None:
    """The watch lags past the deadline: a plain expiry would free a share that is bound, and
    the next pod would be placed on top of it."""
    api.bind_error = httpx.ReadTimeout("timed out")
    scheduler.settings = OperatorSettings(bind_workers=1, batch_window_s=0, assume_ttl_s=0.0)
    scheduler._pod_event("ADDED", stored(api, owned_pod(api, "a-0", 0.55)))
    scheduler.schedule_once()
    drain(scheduler)
    api.bind_error = None
    recheck_due(scheduler)  # no watch event yet; the GET shows it bound
    assert not scheduler.ledger.assumed and scheduler.ledger.tenants[("n0", 0)] == 1
    scheduler._pod_event("ADDED", owned_pod(api, "b-0", 1.0))
    scheduler.schedule_once()
    drain(scheduler)
    assert [b["metadata"]["name"] for b in api.bindings] == ["a-0"]


def test_a_bind_refused_for_certain_frees_the_share_and_parks_the_pod(
    api: FakeApi, scheduler: GpuScheduler
) -> None:
    api.refuse_binds = KubeError(403, "Forbidden", "pods/binding is forbidden")
    scheduler._pod_event("ADDED", owned_pod(api, "a-0", 0.5))
    scheduler.schedule_once()
    drain(scheduler)
    assert not scheduler.ledger.used_gpus()
    assert "forbidden" in scheduler.unschedulable["team/a-0"]


def test_a_malformed_bound_pod_is_reported_and_later_pods_still_bind(
    api: FakeApi, scheduler: GpuScheduler
) -> None:
    bad = owned_pod(api, "bad-0", 0.5)
    bad["spec"]["nodeName"] = "n0"
    bad["metadata"]["annotations"].update(
        {wire.POD_GPU_INDEX: "0", wire.POD_GPU_MEMORY_REQUEST: "20Gi"}
    )
    health = scheduler.health.loop("watch-pods")
    events = iter([("ADDED", bad), ("ADDED", owned_pod(api, "good-0", 0.5))])

    class Watching:  # the API server's side of one list and one watch, then nothing
        def get(self, path: str, **params: str) -> Obj:
            return {"items": [bad], "metadata": {"resourceVersion": "1"}}

        def watch(self, path: str, version: str, **params: str) -> Iterator[tuple[str, Obj]]:
            yield from events
            stop.set()

    stop = threading.Event()
    reflect(Watching(), "/api/v1/pods", scheduler._pods_listed, scheduler._pod_event, stop,  # type: ignore[arg-type]
            health=health, on_error=scheduler._report_bad)  # fmt: skip
    scheduler.schedule_once()
    drain(scheduler)
    scheduler.reporter.submit(lambda: None).result(timeout=10)
    assert [b["metadata"]["name"] for b in api.bindings] == ["good-0"]
    warnings = [e for e in api.events if e["involvedObject"]["name"] == "bad-0"]
    assert len(warnings) == 1, "one event per object and error, not one per watch event"
    assert "gpu-memory-request='20Gi'" in warnings[0]["message"]
    assert scheduler.metrics.handler_errors.labels("watch-pods")._value.get() == 2  # list + event


def test_a_pod_no_inference_service_owns_is_refused_and_not_booked(
    api: FakeApi, scheduler: GpuScheduler
) -> None:
    scheduler._nodes_listed([node("n0", gpus=2)])
    forged = owned_pod(api, "x-0", 0.5)
    forged["metadata"]["ownerReferences"] = []  # made by hand, with Berth's annotations
    scheduler._pod_event("ADDED", forged)
    impostor = owned_pod(api, "y-0", 0.5)
    impostor["metadata"]["labels"][wire.LABEL_SERVICE] = "x"  # claims another service
    scheduler._pod_event("ADDED", impostor)
    scheduler.schedule_once()
    drain(scheduler)
    assert api.bindings == [] and not scheduler.ledger.used_gpus()
    assert set(scheduler.refused) == {"team/x-0", "team/y-0"}
    assert "ReplicaSet" in scheduler.refused["team/x-0"]
    scheduler.schedule_once()  # refused pods are not placed again
    assert not scheduler.ledger.used_gpus()


def test_a_reservation_pod_holds_each_used_gpu_before_its_first_tenant_binds(
    api: FakeApi, scheduler: GpuScheduler
) -> None:
    scheduler._nodes_listed([node("n0", gpus=2)])
    a, b = owned_pod(api, "a-0", 0.5), owned_pod(api, "b-0", 0.5)
    for pod in (a, b):
        scheduler._pod_event("ADDED", pod)
    scheduler.schedule_once()
    drain(scheduler)
    (reservation,) = api.created  # both halves share one GPU, held once
    assert reservation["spec"]["nodeName"] == "n0"
    limits = reservation["spec"]["containers"][0]["resources"]["limits"]
    assert limits[wire.GPU_RESOURCE] == "1"
    assert reservation["metadata"]["annotations"][ANNOTATION_GPU_INDEX] == "0"
    assert reservation["metadata"]["labels"][LABEL_RESERVATION] == "true"
    assert reservation["metadata"]["namespace"] == "berth-system"
    # Tenants gone: the reservation goes too (but only once the ledger has no tenant there).
    for pod, binding in zip((a, b), api.bindings, strict=True):
        scheduler._pod_event("MODIFIED", bound(pod, binding))
    scheduler._reservation_event("ADDED", reservation)
    scheduler._pod_event("DELETED", a)
    with scheduler.lock:
        scheduler._sync_reservations()
    assert api.deleted == []
    scheduler._pod_event("DELETED", b)
    with scheduler.lock:
        scheduler._sync_reservations()
    scheduler.reporter.submit(lambda: None).result(timeout=10)
    assert api.deleted == [
        f"/api/v1/namespaces/berth-system/pods/{reservation['metadata']['name']}"
    ]


def test_a_restarted_scheduler_rebuilds_reservations_from_the_api_server(api: FakeApi) -> None:
    existing = {
        "metadata": {"name": "gpu-n0-0-x", "namespace": "berth-system",
                     "annotations": {ANNOTATION_GPU_INDEX: "0"}, "labels": {LABEL_RESERVATION: "true"}},
        "spec": {"nodeName": "n0"}, "status": {"phase": "Running"},
    }  # fmt: skip
    stray = copy.deepcopy(existing)
    stray["metadata"]["name"] = "gpu-n0-0-y"  # a second one for the same GPU (a crash mid-way)
    s = GpuScheduler(api, OperatorSettings(bind_workers=1))  # type: ignore[arg-type]
    s.reporter.shutdown()
    s.reporter = ThreadPoolExecutor(1)
    try:
        s._nodes_listed([node("n0")])
        s._reservations_listed([existing, stray])
        a = owned_pod(api, "a-0", 0.5)
        a["spec"]["nodeName"] = "n0"
        a["metadata"]["annotations"].update(
            {wire.POD_GPU_INDEX: "0", wire.POD_GPU_MEMORY_REQUEST: str(40 * GIB)}
        )
        s._pods_listed([a])
        with s.lock:
            s._sync_reservations()
        s.reporter.submit(lambda: None).result(timeout=10)
        assert api.created == []  # the GPU is held already
        assert api.deleted == ["/api/v1/namespaces/berth-system/pods/gpu-n0-0-y"]
    finally:
        s.shutdown()


def test_health_fails_when_a_loop_thread_dies_and_readiness_waits_for_sync() -> None:
    health = Health(stuck_after_s=60)
    thread = threading.Thread(target=lambda: None)
    loop = health.loop("watch-pods", thread)
    assert health.unsynced() == ["loop watch-pods has not synced"]
    loop.mark_synced()
    thread.start()
    thread.join()
    assert health.problems() == ["loop watch-pods is dead"] and health.unsynced() == []
    quiet = Health(stuck_after_s=0.5)
    quiet.loop("schedule").last_beat -= 1.0
    (problem,) = quiet.problems()
    assert problem.startswith("loop schedule made no progress for")


def test_malformed_quantities_are_named(api: FakeApi, scheduler: GpuScheduler) -> None:
    pod: dict[str, Any] = owned_pod(api, "m-0", 0.5)
    pod["metadata"]["annotations"] = {wire.POD_WANTS_GPU_MEMORY: "lots"}
    scheduler._pod_event("ADDED", pod)
    scheduler.schedule_once()
    assert "team/m-0" in scheduler.unschedulable and not api.bindings


def foreign_pod(name: str, cpu: str, node: str, phase: str = "Running") -> Obj:
    """A pod kube-scheduler (or anyone) placed: Berth's scheduler sees it only in the watch of
    every pod on a node."""
    return {
        "metadata": {"name": name, "namespace": "web", "uid": f"uid-{name}"},
        "spec": {"nodeName": node, "containers": [{"resources": {"requests": {"cpu": cpu}}}]},
        "status": {"phase": phase},
    }


def test_another_schedulers_pod_holds_cpu_until_it_finishes(
    api: FakeApi, scheduler: GpuScheduler
) -> None:
    scheduler._nodes_listed([node("n0", cpu="4", pods="110")])
    scheduler._node_pods_listed([foreign_pod("nginx", "3", "n0"),
                                 foreign_pod("done", "4", "n0", phase="Succeeded")])  # fmt: skip
    scheduler._pod_event("ADDED", requesting(owned_pod(api, "a-0", 0.5), "2"))
    scheduler.schedule_once()
    assert api.bindings == []
    assert scheduler.unschedulable["team/a-0"] == (
        "0/1 matching nodes have room for the pod: Insufficient cpu on 1 node "
        "(needs 2 CPU, the most free is 1 CPU)"
    )
    scheduler._node_pod_event("MODIFIED", foreign_pod("nginx", "3", "n0", phase="Succeeded"))
    assert not scheduler.unschedulable  # room freed on a GPU node: everyone is tried again
    scheduler.schedule_once()
    drain(scheduler)
    assert [b["metadata"]["name"] for b in api.bindings] == ["a-0"]


def test_berths_own_bound_pod_counts_once_though_both_watches_show_it(
    api: FakeApi, scheduler: GpuScheduler
) -> None:
    scheduler._nodes_listed([node("n0", gpus=2, cpu="4")])
    a = requesting(owned_pod(api, "a-0", 0.5), "2")
    scheduler._pod_event("ADDED", a)
    scheduler.schedule_once()
    drain(scheduler)
    shown = bound(a, api.bindings[0])
    scheduler._node_pod_event("ADDED", shown)  # the all-pods watch is first ...
    scheduler._pod_event("MODIFIED", shown)  # ... then Berth's own confirms it
    scheduler._pod_event("ADDED", requesting(owned_pod(api, "b-0", 0.5), "2"))
    scheduler.schedule_once()
    drain(scheduler)
    assert [b["metadata"]["name"] for b in api.bindings] == ["a-0", "b-0"]  # 2 + 2 of 4 CPU
    assert scheduler.ledger.node_used["n0"].cpu == 4000


def test_an_assumed_pod_holds_its_cpu_so_two_of_one_batch_do_not_overcommit(
    api: FakeApi, scheduler: GpuScheduler
) -> None:
    scheduler._nodes_listed([node("n0", gpus=4, cpu="4")])
    for name in ("a-0", "b-0"):
        scheduler._pod_event("ADDED", requesting(owned_pod(api, name, 0.25), "3"))
    scheduler.schedule_once()
    drain(scheduler)
    assert len(api.bindings) == 1 and scheduler.ledger.assumed  # bound, not yet confirmed
    (parked,) = scheduler.unschedulable.values()
    assert "Insufficient cpu on 1 node" in parked
    scheduler._pod_event("ADDED", requesting(owned_pod(api, "c-0", 0.25), "2"))
    scheduler.schedule_once()  # a later pass: the assumed pod still holds its 3 CPU
    drain(scheduler)
    assert len(api.bindings) == 1 and "team/c-0" in scheduler.unschedulable


def test_a_full_node_takes_no_more_pods(api: FakeApi, scheduler: GpuScheduler) -> None:
    # the proxy, a-0 and its GPU's reservation pod fill the node
    scheduler._nodes_listed([node("n0", gpus=2, pods="3")])
    scheduler._node_pods_listed([foreign_pod("proxy", "0", "n0")])
    for name in ("a-0", "b-0"):
        scheduler._pod_event("ADDED", owned_pod(api, name, 0.5))
    scheduler.schedule_once()
    drain(scheduler)
    assert len(api.bindings) == 1
    assert "Insufficient pods on 1 node" in next(iter(scheduler.unschedulable.values()))


class RacingApi(FakeApi):
    """The fake API server with an event log, so that a test can deliver watch events late and
    hand the scheduler lists taken at any earlier point (``states[k]``: the pods after k events)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, Obj]] = []
        self.states: list[dict[str, Obj]] = [{}]

    def pods(self) -> dict[str, Obj]:
        return {p: o for p, o in self.objects.items() if "/pods/" in p}

    def record(self, kind: str, pod: Obj) -> None:
        self.log.append((kind, copy.deepcopy(pod)))
        self.states.append(copy.deepcopy(self.pods()))

    def post(self, path: str, body: Obj) -> None:
        target = path.removesuffix("/binding")
        before = (self.objects.get(target) or {}).get("spec", {}).get("nodeName")
        try:
            super().post(path, body)
        finally:
            after = self.objects.get(target)
            if after is not None and after["spec"].get("nodeName") and not before:
                self.record("MODIFIED", after)


class SchedulerRaces(RuleBasedStateMachine):
    """Random interleavings of pod creation and deletion, binds that land, time out after
    landing or fail, watch events delivered late, lists taken at any earlier moment, and
    deadline checks: no GPU ever holds more than its capacity in the API server."""

    GPUS, NODE_CPU, POD_CPU = 1, "1", "0"

    def __init__(self) -> None:
        super().__init__()
        self.api = RacingApi()
        settings = OperatorSettings(
            bind_workers=1, batch_window_s=0, assume_ttl_s=0.0, gpu_reservations=False
        )
        self.s = GpuScheduler(self.api, settings)  # type: ignore[arg-type]
        self.s.reporter.shutdown()
        self.s.reporter = ThreadPoolExecutor(1)
        self.s._nodes_listed([node("n0", gpus=self.GPUS, cpu=self.NODE_CPU)])
        self.s._pods_listed([])
        self.s._node_pods_listed([])
        self.consumed = 0  # events of the log the scheduler's watch has delivered
        self.node_consumed = 0  # ... and its watch of every pod on a node
        self.names = 0

    def teardown(self) -> None:
        self.s.shutdown()

    def idle(self) -> None:
        self.s.bind_pool.submit(lambda: None).result(timeout=10)
        self.s.reporter.submit(lambda: None).result(timeout=10)

    @rule(fraction=st.sampled_from([0.5, 0.55, 1.0]))
    def create(self, fraction: float) -> None:
        self.names += 1
        pod = owned_pod(self.api, f"s{self.names}-0", fraction)
        self.api.record("ADDED", stored(self.api, requesting(pod, self.POD_CPU)))

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        pods = sorted(self.api.pods())
        if pods:
            path = data.draw(st.sampled_from(pods))
            self.api.record("DELETED", self.api.objects.pop(path))

    @rule(mode=st.sampled_from(["ok", "timeout-after-landing", "refused-503", "refused-403"]))
    def bind_mode(self, mode: str) -> None:
        self.api.bind_error = httpx.ReadTimeout("t") if mode == "timeout-after-landing" else None
        self.api.refuse_binds = {
            "refused-503": KubeError(503, "ServiceUnavailable", "etcd"),
            "refused-403": KubeError(403, "Forbidden", "no"),
        }.get(mode)

    @rule()
    def schedule(self) -> None:
        with self.s.lock:
            self.s.unschedulable.clear()
        self.s.schedule_once()
        self.idle()

    @rule(n=st.integers(1, 4))
    def deliver(self, n: int) -> None:
        for kind, obj in self.api.log[self.consumed : self.consumed + n]:
            self.s._pod_event(kind, obj)
        self.consumed = min(len(self.api.log), self.consumed + n)

    @rule(data=st.data())
    def relist(self, data: st.DataObject) -> None:
        """A list taken at some moment since the watch broke, handled now; the watch resumes
        from that moment."""
        k = data.draw(st.integers(self.consumed, len(self.api.log)))
        self.s._pods_listed(list(self.api.states[k].values()))
        self.consumed = k

    @rule(n=st.integers(1, 4))
    def deliver_node_pods(self, n: int) -> None:
        for kind, obj in self.api.log[self.node_consumed : self.node_consumed + n]:
            self.s._node_pod_event(kind, obj)
        self.node_consumed = min(len(self.api.log), self.node_consumed + n)

    @rule(data=st.data())
    def relist_node_pods(self, data: st.DataObject) -> None:
        k = data.draw(st.integers(self.node_consumed, len(self.api.log)))
        self.s._node_pods_listed(list(self.api.states[k].values()))
        self.node_consumed = k

    @rule()
    def relist_taken_just_before_the_last_bind(self) -> None:
        """The race of issue 19: the list left the API server just before a bind landed."""
        binds = [i for i, (kind, _) in enumerate(self.api.log) if kind == "MODIFIED"]
        if binds and binds[-1] >= self.consumed:
            k = binds[-1]  # states[k]: everything before that bind
            self.s._pods_listed(list(self.api.states[k].values()))
            self.consumed = k

    @rule()
    def deadlines(self) -> None:
        with self.s.lock:
            self.s._check_due()
        self.idle()

    @invariant()
    def no_gpu_over_capacity_in_the_api_server(self) -> None:
        booked: dict[tuple[str, int], int] = {}
        for pod in self.api.pods().values():
            if pod["spec"].get("nodeName"):
                a = pod["metadata"]["annotations"]
                key = (pod["spec"]["nodeName"], int(a[wire.POD_GPU_INDEX]))
                booked[key] = booked.get(key, 0) + int(a[wire.POD_GPU_MEMORY_REQUEST])
        assert all(v <= CAP_MIB * MIB for v in booked.values()), booked

    @invariant()
    def no_node_over_its_cpu_in_the_api_server(self) -> None:
        bound_pods = [p for p in self.api.pods().values() if p["spec"].get("nodeName")]
        cpu = sum(float(p["spec"]["containers"][0]["resources"]["requests"]["cpu"])
                  for p in bound_pods)  # fmt: skip
        assert cpu <= float(self.NODE_CPU), [p["metadata"]["name"] for p in bound_pods]


SchedulerRaces.TestCase.settings = settings(max_examples=300, stateful_step_count=15, deadline=None)
test_no_interleaving_of_binds_relists_and_late_events_books_a_gpu_twice = SchedulerRaces.TestCase


class CpuRaces(SchedulerRaces):
    """The same interleavings on a node whose GPUs would take four halves but whose CPU takes
    two pods (and the GPUs' reservation pods, 1m each): CPU, not GPU memory, is what runs out."""

    GPUS, NODE_CPU, POD_CPU = 2, "2.01", "1"


CpuRaces.TestCase.settings = settings(max_examples=200, stateful_step_count=25, deadline=None)
test_no_interleaving_of_binds_relists_and_late_events_overcommits_a_nodes_cpu = CpuRaces.TestCase


def test_the_issue_19_interleaving_through_the_event_log_books_nothing_twice() -> None:
    """The race machine's rules in the order of the report (a random search over them did not
    find this order within the example budget when the bug was put back, so it is pinned here):
    A is bound, B was created before A's bind, and a list taken just before that bind arrives."""
    m = SchedulerRaces()
    try:
        m.create(0.55)
        m.deliver(1)
        m.create(1.0)
        m.schedule()
        m.relist_taken_just_before_the_last_bind()
        m.schedule()
        m.no_gpu_over_capacity_in_the_api_server()
        assert [b["metadata"]["name"] for b in m.api.bindings] == ["s1-0"]
    finally:
        m.teardown()


def test_a_list_older_than_a_confirmed_bind_neither_frees_the_share_nor_places_the_pod_again() -> (
    None
):
    """Found by the CPU race machine: A is bound and its deadline's fresh read confirms it; a
    list from before that bind then shows A unbound. A bind is final, so the list is stale on A:
    before, the relist dropped A's confirmed share and queued A again, and B was bound onto A's
    GPU beside it (over capacity in the API server)."""
    m = SchedulerRaces()
    try:
        m.create(0.5)
        m.create(0.55)
        m.deliver(1)
        m.schedule()
        m.deadlines()  # the fresh read confirms A's bind
        m.relist_taken_just_before_the_last_bind()
        m.schedule()
        m.no_gpu_over_capacity_in_the_api_server()
        assert [b["metadata"]["name"] for b in m.api.bindings] == ["s1-0"]
        assert m.s.ledger.tenants[("n0", 0)] == 1 and "team/s1-0" not in m.s.pending
        m.deliver(len(m.api.log))  # the watch catches up: A bound, B still waits
        m.schedule()
        m.no_gpu_over_capacity_in_the_api_server()
        assert len(m.api.bindings) == 1
    finally:
        m.teardown()


def test_without_the_owner_requirement_a_bare_pod_is_bound(api: FakeApi) -> None:
    s = GpuScheduler(api, OperatorSettings(bind_workers=1, require_owner=False))  # type: ignore[arg-type]
    try:
        s._nodes_listed([node("n0")])
        s._reservations_listed([])
        s._pods_listed([])
        bare = owned_pod(api, "bare-0", 0.5)
        bare["metadata"]["ownerReferences"] = []
        s._pod_event("ADDED", bare)
        s.schedule_once()
        s.bind_pool.submit(lambda: None).result(timeout=10)
        assert [b["metadata"]["name"] for b in api.bindings] == ["bare-0"]
    finally:
        s.shutdown()


def test_cpu_races_pinned_stale_lists_of_both_watches_do_not_free_a_bound_pods_cpu() -> None:
    """The CPU machine's rules in one order: two pods bind and take the node's CPU, then both
    watches relist from before those binds; a third pod that the GPUs would take still waits,
    and binds once a bound pod is deleted."""
    m = CpuRaces()
    try:
        for _ in range(3):
            m.create(0.5)
        m.deliver(3)
        m.schedule()
        assert len(m.api.bindings) == 2
        m.relist_taken_just_before_the_last_bind()
        m.s._node_pods_listed(list(m.api.states[3].values()))  # nothing bound yet
        m.schedule()
        m.no_node_over_its_cpu_in_the_api_server()
        assert len(m.api.bindings) == 2
        first = m.api.bindings[0]["metadata"]["name"]
        m.api.record("DELETED", m.api.objects.pop(f"/api/v1/namespaces/team/pods/{first}"))
        m.deliver(4)
        m.deliver_node_pods(len(m.api.log))
        m.schedule()
        m.no_node_over_its_cpu_in_the_api_server()
        assert len(m.api.bindings) == 3
    finally:
        m.teardown()
