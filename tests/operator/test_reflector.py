"""``kube.reflect``: a broken watch resumes from the last resourceVersion, only 410 relists, and
no handler error ends the loop (client-go's reflector semantics)."""

import threading
from collections.abc import Iterator
from typing import Any

import httpx

from berth.operator.health import Health
from berth.operator.kube import KubeError, Obj, reflect


def pod(name: str, version: str) -> Obj:
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "ns", "resourceVersion": version},
    }


class Script:
    """Answers one list per call and plays watch scripts in order; records what was asked."""

    def __init__(self, watches: list[list[Any]]) -> None:
        self.watches = watches
        self.lists = 0
        self.watched_from: list[str] = []
        self.stop = threading.Event()

    def get(self, path: str, **params: str) -> Obj:
        self.lists += 1
        return {"items": [pod("a", "10")], "metadata": {"resourceVersion": "10"}}

    def watch(self, path: str, version: str, **params: str) -> Iterator[tuple[str, Obj]]:
        self.watched_from.append(version)
        if not self.watches:
            self.stop.set()
            return
        for step in self.watches.pop(0):
            if isinstance(step, Exception):
                raise step
            yield step


def run(script: Script, on_event: Any = None, on_error: Any = None) -> Health:
    health = Health()
    reflect(
        script,  # type: ignore[arg-type]
        "/api/v1/pods",
        lambda items: None,
        on_event or (lambda kind, obj: None),
        script.stop,
        health=health.loop("watch-pods"),
        on_error=on_error,
    )
    return health


def test_a_broken_watch_resumes_from_the_last_version_without_a_relist() -> None:
    script = Script([
        [("ADDED", pod("b", "11")), httpx.RemoteProtocolError("peer closed")],
        [KubeError(429, "TooManyRequests", "slow down")],
        [("MODIFIED", pod("b", "12"))],
    ])  # fmt: skip
    health = run(script)
    assert script.lists == 1
    assert script.watched_from == ["10", "11", "11", "12"]
    assert health.metrics.loop_restarts.labels("watch-pods")._value.get() == 2
    assert health.loops["watch-pods"].synced


def test_a_410_relists_and_watches_from_the_new_list() -> None:
    script = Script([[("ADDED", pod("b", "11")), KubeError(410, "Gone", "too old")]])
    run(script)
    assert script.lists == 2 and script.watched_from == ["10", "10"]


def test_a_handler_error_is_reported_with_the_object_and_the_watch_goes_on() -> None:
    seen: list[str] = []
    reported: list[tuple[str, str]] = []

    def on_event(kind: str, obj: Obj) -> None:
        if obj["metadata"]["name"] == "bad":
            raise ValueError("annotation x='20Gi' is not a whole number")
        seen.append(obj["metadata"]["name"])

    script = Script([[("ADDED", pod("bad", "11")), ("ADDED", pod("good", "12"))]])
    health = run(
        script, on_event, lambda obj, e: reported.append((obj["metadata"]["name"], str(e)))
    )
    assert seen == ["good"] and script.lists == 1
    assert reported == [("bad", "annotation x='20Gi' is not a whole number")]
    assert health.metrics.handler_errors.labels("watch-pods")._value.get() == 1


def test_a_failing_list_handler_is_retried_after_a_backoff_not_fatal() -> None:
    calls = []

    def on_list(items: list[Obj]) -> None:
        calls.append(len(items))
        if len(calls) == 1:
            raise RuntimeError("bug")

    script = Script([])
    reflect(script, "/api/v1/pods", on_list, lambda k, o: None, script.stop)  # type: ignore[arg-type]
    assert calls == [1, 1] and script.lists == 2
