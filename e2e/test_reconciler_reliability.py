"""The reconciler against the real control plane (OwnerReferencesPermissionEnforcement on, the
operator under the chart's RBAC): admission refuses every invalid value naming its field, owned
objects come back after a delete or a hand edit, an RBAC failure is named and retried, fields not
acted on get a condition, and of two operator processes only the leader acts."""

import json
import time
from typing import Any

import pytest
import yaml

from berth import wire
from berth.cluster.cluster import ClusterError, LocalCluster
from berth.e2e.admission_cases import ACCEPTED, REFUSED, Refused, accepted_spec, refused_spec
from berth.e2e.operator_fixtures import (
    CHART_NAMESPACE,
    OperatorProcess,
    apply_docs,
    berth_pods,
    condition,
    get_json,
    gpu_capacity,
    gpu_usage,
    install_crds,
    namespace,
    operator,
    runtime_image,
    service_manifest,
    wait_for,
)
from berth.operator.leader import micro_time

pytestmark = pytest.mark.e2e
__all__ = ["namespace", "operator"]  # fixtures


def manifest(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{wire.GROUP}/{wire.VERSION}",
        "kind": "InferenceService",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


def dry_run(cluster: LocalCluster, doc: dict[str, Any]) -> str:
    """Admission only: the API server validates and stores nothing."""
    return cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(doc))


@pytest.fixture(scope="module")
def crds(cluster: LocalCluster) -> None:
    install_crds(cluster)


@pytest.mark.parametrize("case", REFUSED, ids=[c.id for c in REFUSED])
def test_admission_refuses_each_invalid_value_naming_its_field(
    cluster: LocalCluster, crds: None, case: Refused
) -> None:
    with pytest.raises(ClusterError) as refused:
        dry_run(cluster, manifest("refused", refused_spec(case)))
    text = str(refused.value)
    assert case.path in text and case.says in text, text


@pytest.mark.parametrize("spec", ACCEPTED)
def test_admission_takes_the_valid_values_beside_them(
    cluster: LocalCluster, crds: None, spec: dict[str, Any]
) -> None:
    dry_run(cluster, manifest("accepted", accepted_spec(spec)))


# ---- owned objects ------------------------------------------------------------------------


def uid(cluster: LocalCluster, kind: str, name: str, namespace: str) -> str | None:
    try:
        return str(get_json(cluster, kind, name, "-n", namespace)["metadata"]["uid"])
    except ClusterError:
        return None


def test_deleted_and_hand_edited_objects_are_put_back(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str
) -> None:
    apply_docs(cluster, [service_manifest("kept", namespace, 0.25)])
    first = wait_for("kept's Deployment", lambda: uid(cluster, "deployment", "kept", namespace))
    service_uid = wait_for("kept's Service", lambda: uid(cluster, "service", "kept", namespace))
    # Created under the chart's identity with blockOwnerDeletion while the admission plugin
    # OwnerReferencesPermissionEnforcement runs: the ClusterRole grants inferenceservices/finalizers.
    deployment = get_json(cluster, "deployment", "kept", "-n", namespace)
    assert deployment["metadata"]["ownerReferences"][0]["blockOwnerDeletion"] is True

    cluster.kubectl("delete", "deployment", "kept", "-n", namespace, "--wait=false")
    wait_for(
        "the deleted Deployment put back",
        lambda: (u := uid(cluster, "deployment", "kept", namespace)) and u != first,
        timeout=60,
    )

    cluster.kubectl("scale", "deployment", "kept", "-n", namespace, "--replicas=3")
    wait_for(
        "the scaled Deployment put back to 1 replica",
        lambda: get_json(cluster, "deployment", "kept", "-n", namespace)["spec"]["replicas"] == 1,
        timeout=60,
    )

    cluster.kubectl("set", "image", "deployment/kept", "runtime=evil:latest", "-n", namespace)

    def image() -> str:
        live = get_json(cluster, "deployment", "kept", "-n", namespace)
        return str(live["spec"]["template"]["spec"]["containers"][0]["image"])

    wait_for("the image put back", lambda: image() == runtime_image(cluster), timeout=60)

    cluster.kubectl("delete", "service", "kept", "-n", namespace, "--wait=false")
    wait_for(
        "the deleted Service put back",
        lambda: (u := uid(cluster, "service", "kept", namespace)) and u != service_uid,
        timeout=60,
    )
    events = cluster.kubectl(
        "get", "events", "-n", namespace, "--field-selector", "reason=Restored", "-o", "name"
    )
    assert len(events.split()) >= 3, events

    # Deleting the service itself is not drift: its objects go and stay gone.
    cluster.kubectl("delete", "inferenceservice", "kept", "-n", namespace)
    wait_for(
        "the garbage collector to remove kept's Deployment",
        lambda: uid(cluster, "deployment", "kept", namespace) is None,
    )
    time.sleep(3)
    assert uid(cluster, "deployment", "kept", namespace) is None
    assert operator.alive()


# ---- failures named right -----------------------------------------------------------------

FINALIZERS_RULE = {
    "apiGroups": [wire.GROUP],
    "resources": ["inferenceservices/finalizers"],
    "verbs": ["update"],
}


def test_a_forbidden_apply_is_named_and_retried_until_rbac_allows_it(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str
) -> None:
    role = get_json(cluster, "clusterrole", "berth-operator")
    assert FINALIZERS_RULE in role["rules"], "the chart's ClusterRole lacks the finalizers rule"
    without = {**role, "rules": [r for r in role["rules"] if r != FINALIZERS_RULE]}
    for key in ("resourceVersion", "uid", "creationTimestamp", "managedFields"):
        without["metadata"].pop(key, None)
    cluster.kubectl("replace", "-f", "-", input=json.dumps(without))
    try:
        apply_docs(cluster, [service_manifest("locked", namespace, 0.25)])

        def forbidden() -> dict[str, Any] | None:
            service = get_json(cluster, "inferenceservice", "locked", "-n", namespace)
            ready = condition(service, "Ready")
            return ready if ready.get("reason") == "Forbidden" else None

        ready = wait_for("locked's Ready=False/Forbidden", forbidden, timeout=60)
        assert "403" in ready["message"] and "retrying" in ready["message"], ready
        assert uid(cluster, "deployment", "locked", namespace) is None
    finally:
        restored = {**without, "rules": role["rules"]}
        cluster.kubectl("replace", "-f", "-", input=json.dumps(restored))
    wait_for(
        "the retried apply to create locked's Deployment",
        lambda: uid(cluster, "deployment", "locked", namespace),
        timeout=90,
    )

    def no_longer_forbidden() -> bool:
        service = get_json(cluster, "inferenceservice", "locked", "-n", namespace)
        return condition(service, "Ready").get("reason") not in ("Forbidden", None)

    wait_for("locked's condition to clear", no_longer_forbidden, timeout=30)
    assert operator.alive()


def test_fields_not_acted_on_get_a_condition_naming_them(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str
) -> None:
    ignored = service_manifest(
        "ignored",
        namespace,
        0.25,
        sandbox={"runtimeClassName": "gvisor", "deniedSyscalls": ["ptrace"]},
    )
    rendered_only = service_manifest(
        "rendered", namespace, 0.25, sandbox={"runtimeClassName": "gvisor"}
    )
    apply_docs(cluster, [ignored, rendered_only])

    def fields_condition(name: str) -> dict[str, Any]:
        return condition(
            get_json(cluster, "inferenceservice", name, "-n", namespace), "FieldsNotActedOn"
        )

    found = wait_for("ignored's FieldsNotActedOn", lambda: fields_condition("ignored"))
    assert (found["status"], found["reason"]) == ("True", "NotImplemented")
    assert "spec.sandbox.deniedSyscalls" in found["message"]
    assert "runtimeClassName" not in found["message"]
    wait_for(
        "rendered's status",
        lambda: condition(
            get_json(cluster, "inferenceservice", "rendered", "-n", namespace), "Ready"
        ),
    )
    assert fields_condition("rendered") == {}
    deployment = get_json(cluster, "deployment", "rendered", "-n", namespace)
    assert deployment["spec"]["template"]["spec"]["runtimeClassName"] == "gvisor"


# ---- two operator processes ---------------------------------------------------------------


def lease(cluster: LocalCluster) -> dict[str, Any]:
    """The operator's Lease's spec; empty before the first candidate created it."""
    try:
        found = get_json(cluster, "lease", "berth-operator", "-n", CHART_NAMESPACE)
    except ClusterError:
        return {}
    return dict(found["spec"])


def leading(process: OperatorProcess, holder: str) -> bool:
    return f"leading as {holder}" in process.log_tail(2000)


def check_within_capacity(cluster: LocalCluster) -> None:
    capacity = gpu_capacity(cluster)
    for (node, index), tenants in gpu_usage(cluster).items():
        assert sum(r for _, r in tenants) <= capacity[node], f"{node} GPU {index}: {tenants}"


def placed(cluster: LocalCluster, namespace: str, count: int) -> bool:
    pods = berth_pods(cluster, namespace)
    return len(pods) == count and all(p["spec"].get("nodeName") for p in pods)


def test_only_the_leader_acts_and_a_follower_takes_over_when_it_is_killed(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str, tmp_path: Any
) -> None:
    holder = wait_for("a leader", lambda: lease(cluster).get("holderIdentity"))
    assert leading(operator, holder), "the module's operator is not the leader"
    follower = OperatorProcess(cluster, tmp_path, kubeconfig=operator.kubeconfig)
    follower.start()
    try:
        wait_for("the follower to campaign", lambda: "waiting to lead" in follower.log_tail(), 60)
        before = [service_manifest(f"b{i}", namespace, f) for i, f in enumerate((0.5, 0.25, 0.75))]
        apply_docs(cluster, before)
        wait_for("the first services placed", lambda: placed(cluster, namespace, 3), timeout=90)
        transitions = lease(cluster).get("leaseTransitions", 0)
        log = follower.log_tail(2000)
        assert "Handler 'reconcile'" not in log and "bound" not in log.lower(), log

        operator.kill()  # SIGKILL: no release, the follower must wait the lease out
        killed = time.monotonic()
        after = [service_manifest(f"a{i}", namespace, f) for i, f in enumerate((0.5, 0.5, 0.25))]
        apply_docs(cluster, after)
        new = wait_for(
            "the follower to take the lease",
            lambda: (h := lease(cluster).get("holderIdentity")) != holder and h,
            timeout=60,
        )
        assert leading(follower, new)
        assert time.monotonic() - killed >= 10  # it waited the lease out (15 s from its view)
        assert lease(cluster)["leaseTransitions"] == transitions + 1
        wait_for("every service placed", lambda: placed(cluster, namespace, 6), timeout=120)
        check_within_capacity(cluster)
        names = {p["metadata"]["name"].rsplit("-", 2)[0] for p in berth_pods(cluster, namespace)}
        assert names == {"b0", "b1", "b2", "a0", "a1", "a2"}
    finally:
        operator.start()  # the module's operator comes back as a follower
        follower.stop()  # a clean exit releases the lease: the module's operator leads again
        print(follower.log_tail(), flush=True)
    wait_for("the module's operator to lead again", lambda: "leading as" in operator.log_tail(), 60)


def test_a_leader_whose_lease_is_taken_stops_acting_by_exiting(
    cluster: LocalCluster, operator: OperatorProcess
) -> None:
    holder = wait_for("a leader", lambda: lease(cluster).get("holderIdentity"), timeout=60)
    assert leading(operator, holder), "the module's operator is not the leader"
    patch = {"spec": {"holderIdentity": "intruder", "renewTime": micro_time()}}
    cluster.kubectl("patch", "lease", "berth-operator", "-n", CHART_NAMESPACE, "--type=merge",
                    "-p", json.dumps(patch))  # fmt: skip
    wait_for("the deposed leader to exit", lambda: not operator.alive(), timeout=10, every=0.2)
    assert operator.process is not None and operator.process.returncode == 75
    assert "leadership lost" in operator.log_tail()
    operator.start()  # as its Deployment would: a follower until the intruder's lease expires
    wait_for("the restarted operator to lead", lambda: "leading as" in operator.log_tail(), 60)
