"""The node agent installs sandboxed pods' seccomp profiles: the operator's rendering of a pod in,
the kubelet's seccomp folder out, fed by its watch of the pods bound to its node."""

import copy
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from berth import wire
from berth.operator import api, render, seccomp
from berth.operator.settings import OperatorSettings
from berth.runtime.agent.pod_watch import PodWatch
from berth.runtime.agent.seccomp_sync import SeccompProfiles, wanted_profile

Obj = dict[str, Any]
NODE = "real-node-0"


def pod(name: str, uid: str, denied: list[str] | None = None, phase: str = "Running") -> Obj:
    """A pod as the Deployment controller makes it from the operator's rendering."""
    spec: Obj = {"model": {"source": {"hostPath": {"path": "/models/m"}}}, "gpu": {"fraction": 0.5}}
    if denied is not None:
        spec["sandbox"] = {"enabled": True, "deniedSyscalls": denied}
    service = api.InferenceService.model_validate(
        {"metadata": {"name": "agent", "namespace": "team", "uid": "s-1"}, "spec": spec}
    )
    template = render.deployment(service, OperatorSettings())["spec"]["template"]
    metadata = {**copy.deepcopy(template["metadata"]), "name": name, "namespace": "team",
                "uid": uid, "resourceVersion": "1"}  # fmt: skip
    return {"metadata": metadata, "spec": {**template["spec"], "nodeName": NODE},
            "status": {"phase": phase}}  # fmt: skip


def test_a_sandboxed_pod_gets_its_profile_under_the_name_it_asks_for(tmp_path: Path) -> None:
    sandboxed = pod("p", "u-1", ["ptrace"])
    name, text = wanted_profile(sandboxed) or ("", "")
    assert name == sandboxed["spec"]["securityContext"]["seccompProfile"]["localhostProfile"]
    assert text == seccomp.profile_json(["ptrace"])
    profiles = SeccompProfiles(tmp_path)
    profiles.pod_seen(sandboxed)
    written = tmp_path / name
    assert json.loads(written.read_text()) == seccomp.profile(["ptrace"])
    assert written.stat().st_mode & 0o777 == 0o644
    assert not profiles.install(name, text)  # there already: never rewritten
    assert [p.name for p in written.parent.iterdir()] == [written.name]  # no temporary left


def test_pods_without_a_profile_or_with_a_foreign_one_get_nothing(tmp_path: Path) -> None:
    plain = pod("p", "u-1")
    assert wanted_profile(plain) is None
    forged = pod("q", "u-2", ["ptrace"])
    forged["metadata"]["annotations"][wire.POD_SECCOMP_PROFILE] = seccomp.profile_json([])
    assert wanted_profile(forged) is None  # its content is not what it asks for
    SeccompProfiles(tmp_path).pod_seen(forged)
    assert not any(tmp_path.iterdir())


def test_only_a_name_its_text_hashes_to_is_written(tmp_path: Path) -> None:
    text = seccomp.profile_json(["ptrace"])
    other = seccomp.profile_name(seccomp.profile_json([]))
    for name in (other, "../../etc/passwd", "berth/x.json"):
        with pytest.raises(ValueError, match="not the Berth profile name"):
            SeccompProfiles(tmp_path).install(name, text)
    assert not any(tmp_path.iterdir())


# ---- the pod watch ----------------------------------------------------------------------------


class Script:
    """Answers the list with ``listed`` then plays ``watches``; records what was asked."""

    def __init__(self, listed: list[Obj], watches: list[list[tuple[str, Obj]]]) -> None:
        self.listed, self.watches = listed, watches
        self.asked: list[dict[str, str]] = []
        self.stop = threading.Event()

    def get(self, path: str, **params: str) -> Obj:
        self.asked.append(params)
        items, self.listed = self.listed, []
        return {"items": items, "metadata": {"resourceVersion": "5"}}

    def watch(self, path: str, version: str, **params: str) -> Iterator[tuple[str, Obj]]:
        if not self.watches:
            self.stop.set()
            return
        yield from self.watches.pop(0)


def watch(
    script: Script, seen: list[Any], gone: list[Any] | None = None, listed: list[Any] | None = None
) -> PodWatch:
    w = PodWatch(script, NODE, on_seen=seen, on_gone=gone or [], on_listed=listed or [])  # type: ignore[arg-type]
    w.stop = script.stop
    w._run()  # in this thread: returns once the script is played
    return w


def test_the_watch_asks_for_berth_pods_on_its_node_and_installs_their_profiles(
    tmp_path: Path,
) -> None:
    first, later = pod("a", "u-1", ["ptrace"]), pod("b", "u-2", ["mknodat"])
    script = Script([first], [[("ADDED", later)]])
    watch(script, [SeccompProfiles(tmp_path).pod_seen])
    assert script.asked[0] == {
        "fieldSelector": f"spec.nodeName={NODE}",
        "labelSelector": wire.LABEL_SERVICE,
    }
    for each in (first, later):
        name = each["spec"]["securityContext"]["seccompProfile"]["localhostProfile"]
        assert (tmp_path / name).read_text() == each["metadata"]["annotations"][
            wire.POD_SECCOMP_PROFILE
        ]


def test_gone_pods_are_reported_once_whether_deleted_finished_or_missing_from_a_relist() -> None:
    a, b, c = pod("a", "u-1"), pod("b", "u-2"), pod("c", "u-3")
    done = pod("c", "u-3", phase="Succeeded")
    script = Script([a, b, c], [[("DELETED", a), ("DELETED", a), ("MODIFIED", done)]])
    gone: list[str] = []
    w = watch(script, [lambda p: None], [lambda p: gone.append(p["metadata"]["name"])])
    assert gone == ["a", "c"] and list(w.pods) == ["u-2"]
    w._listed([])  # a relist without b
    assert gone == ["a", "c", "b"] and not w.pods


def test_a_failing_handler_does_not_keep_the_pod_from_the_others() -> None:
    seen: list[str] = []

    def broken(p: Obj) -> None:
        raise OSError("disk full")

    watch(Script([pod("a", "u-1")], []), [broken, lambda p: seen.append(p["metadata"]["name"])])
    assert seen == ["a"]


def test_after_a_whole_list_is_handed_out_the_listed_hooks_run() -> None:
    calls: list[str] = []
    script = Script([pod("a", "u-1"), pod("b", "u-2")], [[("ADDED", pod("c", "u-3"))]])
    watch(
        script,
        [lambda p: calls.append(p["metadata"]["name"])],
        listed=[lambda: calls.append("listed")],
    )
    assert calls == ["a", "b", "listed", "c"]
