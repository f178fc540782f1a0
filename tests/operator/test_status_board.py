"""The status board's bookkeeping: which changes lead to a status refresh, and what it sees.

The reflector callbacks are driven directly with the objects the API server would send; the
board's writes to the API server are covered end to end in e2e/test_operator.py.
"""

import time
from typing import Any

from berth import wire
from berth.operator import sandbox
from berth.operator.kube import KubeClient
from berth.operator.status import ApplyFailure
from berth.operator.status_board import StatusBoard, service_info

KEY = ("team", "llama")


def isvc(
    generation: int = 1, replicas: int = 2, status: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "apiVersion": f"{wire.GROUP}/{wire.VERSION}",
        "kind": "InferenceService",
        "metadata": {"name": "llama", "namespace": "team", "uid": "u1", "generation": generation},
        "spec": {"model": {"source": {"hostPath": {"path": "/m"}}}, "gpu": {"fraction": 0.5},
                 "replicas": replicas},
        "status": status or {},
    }  # fmt: skip


def pod(name: str, node: str = "", heartbeat: str = "t0") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "team", "labels": {wire.LABEL_SERVICE: "llama"},
                     "annotations": {"heartbeat": heartbeat}},
        "spec": {"nodeName": node} if node else {},
        "status": {"phase": "Pending"},
    }  # fmt: skip


def board() -> StatusBoard:
    return StatusBoard(KubeClient("https://127.0.0.1:1", False, None, None))


def take(b: StatusBoard) -> Any:
    with b.lock:
        return b._next()


def test_spec_is_parsed_once_per_generation() -> None:
    first = service_info(isvc(replicas=2), None)
    assert first.desired_replicas == 2 and first.url == "http://llama.team.svc:8000/v1"
    same_generation = service_info(isvc(replicas=3), first)
    assert same_generation.desired_replicas == 2  # generation 1 was already parsed
    assert service_info(isvc(generation=2, replicas=3), first).desired_replicas == 3


def test_changes_that_matter_schedule_one_refresh_with_the_current_picture() -> None:
    b = board()
    b._services_listed(None, [isvc()])
    b._pod_event("ADDED", pod("p0"))
    b._pod_event("ADDED", pod("p1"))
    assert list(b.due) == [KEY]  # one refresh for the burst
    started = time.monotonic()
    key, view, previous = take(b)
    assert time.monotonic() - started >= 0.4  # gathered for REFRESH_DELAY_S first
    assert key == KEY and view.desired_replicas == 2 and previous == {}
    assert sorted(p.name for p in view.pods) == ["p0", "p1"]
    assert not any(p.bound for p in view.pods)
    assert KEY in b.in_flight

    b._pod_event("MODIFIED", pod("p0", heartbeat="t1"))  # nothing the status reads changed
    assert not b.due
    b._pod_event("MODIFIED", pod("p0", node="gpu-3"))
    assert KEY in b.due


def test_our_own_status_write_coming_back_is_not_a_change() -> None:
    b = board()
    b._services_listed(None, [isvc()])
    take(b)
    b.written[KEY] = {"readyReplicas": 0}
    b.in_flight.clear()
    b._service_event("MODIFIED", isvc(status={"readyReplicas": 0}))
    assert not b.due
    b._service_event("MODIFIED", isvc(generation=2, status={"readyReplicas": 0}))
    assert KEY in b.due  # a new spec is


def test_a_refresh_is_at_least_the_write_interval_after_the_last_write() -> None:
    b = board()
    b._services_listed(None, [isvc()])
    take(b)
    b.in_flight.clear()
    b.written_at[KEY] = time.monotonic()
    b._pod_event("ADDED", pod("p0"))
    assert b.due[KEY] - b.written_at[KEY] >= 2.0


def test_a_deleted_service_is_forgotten() -> None:
    b = board()
    b._services_listed(None, [isvc()])
    b._pod_event("ADDED", pod("p0"))
    b._service_event("DELETED", isvc())
    assert KEY not in b.services and KEY not in b.pods and KEY not in b.written


def test_pods_of_a_service_come_and_go_without_leftovers() -> None:
    b = board()
    b._pod_event("ADDED", pod("p0"))
    b._pod_event("ADDED", pod("p1"))
    b._pod_event("DELETED", pod("p0"))
    assert list(b.pods[KEY]) == ["p1"]
    b._pod_event("DELETED", pod("p1"))
    b._pod_event("DELETED", pod("p1"))  # a repeat (relist) is harmless
    assert KEY not in b.pods


def test_a_failed_write_is_tried_again_after_the_write_interval() -> None:
    b = board()  # its API server address refuses connections
    b._services_listed(None, [isvc()])
    b._refresh(*take(b))
    assert KEY not in b.in_flight and KEY not in b.written
    assert b.due[KEY] - b.written_at[KEY] >= 2.0


def test_a_relist_of_one_namespace_leaves_the_others_alone() -> None:
    b = board()
    other = {**isvc(), "metadata": {**isvc()["metadata"], "namespace": "other", "uid": "u2"}}
    b._services_listed("team", [isvc()])
    b._services_listed("other", [other])
    b._pods_listed("team", [pod("p0")])
    b._services_listed("other", [])  # "other" emptied; "team" untouched
    assert list(b.services) == [KEY] and list(b.pods) == [KEY]
    b._pods_listed("team", [])
    assert not b.pods


def test_the_view_names_the_fields_a_spec_sets_that_nothing_acts_on() -> None:
    b = board()
    obj = isvc()
    obj["spec"]["sandbox"] = {"deniedSyscalls": ["ptrace"]}
    b._services_listed(None, [obj])
    _, view, _ = take(b)
    assert view.not_acted_on == ("spec.sandbox.deniedSyscalls",)


def test_the_view_says_when_egress_hosts_need_an_engine_the_cluster_lacks() -> None:
    obj = isvc()
    obj["spec"]["sandbox"] = {"enabled": True, "egress": [{"hosts": ["api.example.com"]}]}
    b = board()
    b._services_listed(None, [obj])
    _, view, _ = take(b)
    assert view.hosts_note is not None and "api.example.com" in view.hosts_note
    client = KubeClient("https://127.0.0.1:1", False, None, None)
    with_cilium = StatusBoard(client, engines=sandbox.PolicyEngines(cilium=True))
    with_cilium._services_listed(None, [obj])
    _, view, _ = take(with_cilium)
    assert view.hosts_note is None


def test_an_apply_failure_is_marked_once_and_cleared_once() -> None:
    b = board()
    b._services_listed(None, [isvc()])
    take(b)
    b.in_flight.clear()
    failure = ApplyFailure("Forbidden", "applying Deployment llama failed: 403")
    b.render_error(KEY, 1, failure)
    _, view, _ = take(b)
    assert view.render_error == failure
    b.in_flight.clear()
    b.render_error(KEY, 1, failure)  # a retry that fails the same way changes nothing
    assert not b.due
    b.render_error(KEY, 1, None)
    assert KEY in b.due and b.render_errors == {}
