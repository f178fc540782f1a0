"""``drifted``: a field Berth renders and the live object changed, as server-side apply sees it."""

import copy
from typing import Any

from berth.operator.drift import drifted


def deployment() -> dict[str, Any]:
    container = {
        "name": "runtime",
        "image": "berth-runtime:1",
        "args": ["--model", "/models"],
        "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
        "resources": {"requests": {"cpu": "0.5", "memory": "1Gi"}},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "m", "namespace": "ns", "labels": {"app": "m"}},
        "spec": {"replicas": 2, "template": {"spec": {"containers": [container]}}},
    }


def container(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


def test_a_missing_object_has_drifted() -> None:
    assert drifted(deployment(), None)


def test_defaults_status_and_other_managers_fields_are_not_drift() -> None:
    live = copy.deepcopy(deployment())
    live["metadata"]["labels"]["team"] = "ml"  # another manager's label
    live["metadata"]["resourceVersion"] = "12"
    live["status"] = {"replicas": 3}
    container(live)["imagePullPolicy"] = "IfNotPresent"
    container(live)["resources"]["requests"]["cpu"] = "500m"  # the API server's spelling
    container(live)["env"].insert(0, {"name": "EXTRA", "value": "x"})  # merged in by name
    live["spec"]["template"]["spec"]["containers"].append({"name": "sidecar", "image": "s"})
    assert not drifted(deployment(), live)


def test_a_changed_rendered_field_is_drift() -> None:
    for edit in (
        lambda d: d["spec"].update(replicas=3),
        lambda d: container(d).update(image="other:2"),
        lambda d: container(d).update(args=["--model", "/elsewhere"]),
        lambda d: container(d)["args"].append("--extra"),
        lambda d: container(d)["env"].pop(),
        lambda d: container(d)["resources"]["requests"].update(cpu="1"),
        lambda d: d["metadata"]["labels"].update(app="n"),
        lambda d: d["spec"]["template"]["spec"]["containers"].clear(),
    ):
        live = copy.deepcopy(deployment())
        edit(live)
        assert drifted(deployment(), live), live
