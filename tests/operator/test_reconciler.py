"""The reconciler's handlers against a fake API client: failures named and retried right, owned
objects put back when deleted or edited, nothing applied when nothing drifted."""

import asyncio
import copy
from typing import Any

import httpx
import kopf
import pytest

from berth import wire
from berth.operator import reconciler, sandbox
from berth.operator.kube import KubeError, Obj
from berth.operator.settings import OperatorSettings
from berth.operator.status_board import StatusBoard

UID = "0b7c1e3a-0000-4000-8000-000000000001"


class FakeClient:
    """Records writes; ``fail[kind]`` is raised by the next applies of that kind."""

    def __init__(self) -> None:
        self.applied: list[Obj] = []
        self.deleted: list[str] = []
        self.events: list[Obj] = []
        self.fail: dict[str, list[Exception]] = {}
        self.unlabelled_pods: list[str] = []  # pods listed by the routing label's absence
        self.writes: list[tuple[str, str]] = []  # ("apply", kind) and ("patch", path) in order

    def apply(self, obj: Obj, force: bool = True) -> None:
        failures = self.fail.get(obj["kind"])
        if failures:
            raise failures.pop(0)
        self.applied.append(copy.deepcopy(obj))
        self.writes.append(("apply", obj["kind"]))

    def get(self, path: str, **params: str) -> Obj:
        assert path == "/api/v1/namespaces/ml/pods", path
        assert params == {"labelSelector": f"{wire.LABEL_SERVICE}=llama,!{wire.LABEL_ROUTED}"}
        return {"items": [{"metadata": {"name": n}} for n in self.unlabelled_pods]}

    def merge_patch(self, path: str, body: Obj) -> None:
        assert body["metadata"]["labels"] == {wire.LABEL_ROUTED: "true"}, body
        self.writes.append(("patch", path))

    def delete(self, path: str) -> None:
        self.deleted.append(path)
        raise KubeError(404, "NotFound", "not found")

    def post(self, path: str, body: Obj) -> None:
        self.events.append(body)


def service_body(generation: int = 1, **spec: Any) -> Obj:
    return {
        "apiVersion": f"{wire.GROUP}/{wire.VERSION}",
        "kind": "InferenceService",
        "metadata": {"name": "llama", "namespace": "ml", "uid": UID, "generation": generation},
        "spec": {
            "model": {"source": {"hostPath": {"path": "/models/llama"}}},
            "gpu": {"fraction": 0.5},
            **spec,
        },
    }


@pytest.fixture
def memo() -> reconciler.Shared:
    client: Any = FakeClient()
    return reconciler.Shared(OperatorSettings(), client, StatusBoard(client))


def reconcile(
    memo: reconciler.Shared,
    body: Obj,
    retry: int = 0,
    reason: str = "create",
    old: Obj | None = None,
) -> None:
    """As kopf calls it; ``old`` is the previous spec of an update (the handler's field)."""
    asyncio.run(
        reconciler.reconcile(
            body=kopf.Body(body),
            reason=kopf.Reason(reason),
            retry=retry,
            memo=memo,
            old=old,
            new=body["spec"],
        )
    )


def failure(memo: reconciler.Shared) -> tuple[str, str] | None:
    entry = memo.board.render_errors.get(("ml", "llama"))
    return (entry[1].reason, entry[1].message) if entry else None


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (KubeError(403, "Forbidden", "cannot set blockOwnerDeletion"), "Forbidden"),
        (KubeError(500, "InternalError", "etcdserver: request timed out"), "ApplyFailed"),
        (KubeError(503, "ServiceUnavailable", "the server is shutting down"), "ApplyFailed"),
        (KubeError(429, "TooManyRequests", "slow down"), "ApplyFailed"),
        (httpx.ConnectError("connection refused"), "ApplyFailed"),
    ],
)
def test_api_server_failures_are_retried_and_never_called_invalid_spec(
    memo: reconciler.Shared, error: Exception, reason: str
) -> None:
    memo.client.fail["Deployment"] = [error]  # type: ignore[attr-defined]
    with pytest.raises(kopf.TemporaryError) as raised:
        reconcile(memo, service_body())
    assert raised.value.delay == reconciler.RETRY_BASE_S
    got = failure(memo)
    assert got is not None and got[0] == reason
    assert "Deployment llama" in got[1] and "retrying" in got[1]
    warnings = [e for e in memo.client.events if e["type"] == "Warning"]  # type: ignore[attr-defined]
    assert [e["reason"] for e in warnings] == [reason]

    reconcile(memo, service_body(), retry=1)  # the retry goes through and clears the condition
    assert failure(memo) is None
    assert [o["kind"] for o in memo.client.applied] == ["Deployment", "Service"]  # type: ignore[attr-defined]


def test_pods_older_than_the_routing_label_are_routed_before_the_service_selects_on_it(
    memo: reconciler.Shared,
) -> None:
    client: Any = memo.client
    client.unlabelled_pods = ["llama-a-1", "llama-a-2"]
    reconcile(memo, service_body(), reason="resume")
    patches = [w for w in client.writes if w[0] == "patch"]
    assert patches == [("patch", f"/api/v1/namespaces/ml/pods/llama-a-{i}") for i in (1, 2)]
    assert client.writes.index(patches[-1]) < client.writes.index(("apply", "Service"))
    service = next(o for o in client.applied if o["kind"] == "Service")
    assert service["spec"]["selector"][wire.LABEL_ROUTED] == "true"


def test_a_refused_object_is_invalid_spec_and_not_retried(memo: reconciler.Shared) -> None:
    refusal = KubeError(422, "Invalid", "spec.template.spec.containers[0].env[6]: bad fieldPath")
    memo.client.fail["Deployment"] = [refusal]  # type: ignore[attr-defined]
    with pytest.raises(kopf.PermanentError):
        reconcile(memo, service_body())
    got = failure(memo)
    assert got is not None and got[0] == "InvalidSpec" and "bad fieldPath" in got[1]


def test_retries_back_off_exponentially_up_to_a_cap() -> None:
    delays = [reconciler.retry_delay(n) for n in range(12)]
    assert delays[:4] == [1.0, 2.0, 4.0, 8.0]
    assert delays == sorted(delays) and max(delays) == reconciler.RETRY_CAP_S
    assert reconciler.retry_delay(10_000) == reconciler.RETRY_CAP_S


def test_a_spec_with_fields_not_acted_on_gets_a_warning_event(memo: reconciler.Shared) -> None:
    reconcile(memo, service_body(sandbox={"deniedSyscalls": ["ptrace"]}))  # not enabled
    reasons = {e["reason"]: e["message"] for e in memo.client.events}  # type: ignore[attr-defined]
    assert "spec.sandbox.deniedSyscalls" in reasons["FieldsNotActedOn"]
    assert "Created" in reasons


# ---- the sandbox's policies ---------------------------------------------------------------

SANDBOX = {"enabled": True, "egress": [{"hosts": ["api.example.com"], "ports": [443]}]}


def test_a_sandbox_applies_its_policies_and_those_of_the_engines_found(
    memo: reconciler.Shared,
) -> None:
    reconcile(memo, service_body(sandbox=SANDBOX))
    kinds = [o["kind"] for o in memo.client.applied]  # type: ignore[attr-defined]
    assert kinds == ["Deployment", "Service", "NetworkPolicy"]
    cilium = reconciler.Shared(
        memo.settings, memo.client, memo.board, sandbox.PolicyEngines(cilium=True, tetragon=True)
    )
    memo.client.applied.clear()  # type: ignore[attr-defined]
    reconcile(cilium, service_body(sandbox={**SANDBOX, "deniedSyscalls": ["ptrace"]}))
    kinds = [o["kind"] for o in memo.client.applied]  # type: ignore[attr-defined]
    assert kinds[2:] == ["NetworkPolicy", "CiliumNetworkPolicy", "TracingPolicyNamespaced"]


def test_dropping_the_sandbox_prunes_its_policies_and_other_updates_leave_them(
    memo: reconciler.Shared,
) -> None:
    sealed = service_body(sandbox=SANDBOX)
    reconcile(memo, sealed)
    reconcile(
        memo, service_body(2, sandbox=SANDBOX, replicas=1), reason="update", old=sealed["spec"]
    )
    deleted = memo.client.deleted  # type: ignore[attr-defined]
    assert [p.rsplit("/", 2)[-2] for p in deleted] == ["poddisruptionbudgets"]
    deleted.clear()
    reconcile(memo, service_body(3), reason="update", old=sealed["spec"])
    assert "/apis/networking.k8s.io/v1/namespaces/ml/networkpolicies/llama" in deleted


class CrdClient:
    """Answers CRD reads: the names in ``present`` exist, ``refuse`` answers 403."""

    def __init__(self, present: set[str], refuse: int | None = None) -> None:
        self.present, self.refuse = present, refuse

    def get(self, path: str) -> Obj:
        name = path.rsplit("/", 1)[-1]
        if self.refuse is not None:
            raise KubeError(self.refuse, "Refused", "no")
        if name not in self.present:
            raise KubeError(404, "NotFound", "not found")
        return {"metadata": {"name": name}}


def test_policy_engines_are_found_by_their_crds() -> None:
    client: Any = CrdClient({sandbox.CILIUM_CRD})
    assert reconciler.discover_engines(client) == sandbox.PolicyEngines(cilium=True)
    client = CrdClient({sandbox.CILIUM_CRD, sandbox.TETRAGON_CRD})
    assert reconciler.discover_engines(client) == sandbox.PolicyEngines(True, True)
    assert reconciler.discover_engines(CrdClient(set(), refuse=403)) == sandbox.NO_ENGINES  # type: ignore[arg-type]
    with pytest.raises(KubeError):
        reconciler.discover_engines(CrdClient(set(), refuse=500))  # type: ignore[arg-type]


# ---- put_back: the owned objects ----------------------------------------------------------


def rendered(memo: reconciler.Shared, kind: str, body: Obj | None = None) -> Obj:
    reconcile(memo, body or service_body())
    (obj,) = [o for o in memo.client.applied if o["kind"] == kind]  # type: ignore[attr-defined]
    memo.client.applied.clear()  # type: ignore[attr-defined]
    return obj


def put_back(memo: reconciler.Shared, kind: str, obj: Obj, owner: Obj | None) -> list[Obj]:
    index = {}
    if owner is not None:
        index[("ml", "llama")] = [reconciler.services_by_key(kopf.Body(owner))[("ml", "llama")]]
    event = {"type": kind, "object": obj}
    asyncio.run(
        reconciler.put_back(event=event, body=kopf.Body(obj), memo=memo, services_by_key=index)
    )
    return list(memo.client.applied)  # type: ignore[attr-defined]


def with_server_defaults(deployment: Obj) -> Obj:
    live = copy.deepcopy(deployment)
    live["metadata"].update(uid="d-1", resourceVersion="7", generation=1)
    live["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = "1"
    live["spec"]["revisionHistoryLimit"] = 10
    pod = live["spec"]["template"]["spec"]
    pod.update(dnsPolicy="ClusterFirst", restartPolicy="Always", securityContext={})
    pod["containers"][0].update(terminationMessagePath="/dev/termination-log")
    live["status"] = {"replicas": 1, "readyReplicas": 1}
    return live


def test_a_deleted_deployment_is_put_back(memo: reconciler.Shared) -> None:
    deployment = rendered(memo, "Deployment")
    assert put_back(memo, "DELETED", with_server_defaults(deployment), service_body()) == [
        deployment
    ]
    reasons = [e["reason"] for e in memo.client.events]  # type: ignore[attr-defined]
    assert "Restored" in reasons


@pytest.mark.parametrize("edit", ["replicas", "image", "our env var"])
def test_a_hand_edited_deployment_is_put_back(memo: reconciler.Shared, edit: str) -> None:
    deployment = rendered(memo, "Deployment")
    live = with_server_defaults(deployment)
    container = live["spec"]["template"]["spec"]["containers"][0]
    if edit == "replicas":
        live["spec"]["replicas"] = 5
    elif edit == "image":
        container["image"] = "evil:latest"
    else:
        container["env"] = [e for e in container["env"] if e["name"] != wire.ENV_VISIBLE_DEVICES]
    assert put_back(memo, "MODIFIED", live, service_body()) == [deployment]


def test_an_object_as_rendered_plus_server_defaults_is_left_alone(memo: reconciler.Shared) -> None:
    deployment = rendered(memo, "Deployment")
    assert put_back(memo, "MODIFIED", with_server_defaults(deployment), service_body()) == []
    service = rendered(memo, "Service")
    live = copy.deepcopy(service)
    live["spec"].update(clusterIP="10.96.0.12", type="ClusterIP", sessionAffinity="None")
    assert put_back(memo, "MODIFIED", live, service_body()) == []


def test_objects_of_a_service_being_deleted_or_gone_are_not_put_back(
    memo: reconciler.Shared,
) -> None:
    deployment = with_server_defaults(rendered(memo, "Deployment"))
    assert put_back(memo, "DELETED", deployment, None) == []
    going = service_body()
    going["metadata"]["deletionTimestamp"] = "2026-12-03T15:00:00Z"
    assert put_back(memo, "DELETED", deployment, going) == []
    successor = service_body()
    successor["metadata"]["uid"] = "another-service-of-the-same-name"
    assert put_back(memo, "DELETED", deployment, successor) == []


def test_a_failed_repair_is_retried_while_the_owner_stays_as_it_was(
    memo: reconciler.Shared, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reconciler, "retry_delay", lambda attempt: 0.0)
    deployment = rendered(memo, "Deployment")
    memo.client.fail["Deployment"] = [KubeError(500, "InternalError", "x")] * 7  # type: ignore[attr-defined]
    assert put_back(memo, "DELETED", with_server_defaults(deployment), service_body()) == [
        deployment
    ]
    assert failure(memo) is None  # cleared once the repair went through


def test_a_repair_stops_retrying_once_the_owner_changes(
    memo: reconciler.Shared, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = with_server_defaults(rendered(memo, "Deployment"))
    index = {
        ("ml", "llama"): [reconciler.services_by_key(kopf.Body(service_body()))[("ml", "llama")]]
    }
    attempts: list[int] = []

    def delay(attempt: int) -> float:
        attempts.append(attempt)
        if attempt == 3:  # meanwhile the user changed the spec: reconcile takes it from here
            index[("ml", "llama")][0]["metadata"]["generation"] = 2
        return 0.0

    monkeypatch.setattr(reconciler, "retry_delay", delay)
    memo.client.fail["Deployment"] = [KubeError(403, "Forbidden", "no")] * 99  # type: ignore[attr-defined]
    event = {"type": "DELETED", "object": deployment}
    asyncio.run(
        reconciler.put_back(
            event=event, body=kopf.Body(deployment), memo=memo, services_by_key=index
        )
    )
    assert attempts == [0, 1, 2, 3] and memo.client.applied == []  # type: ignore[attr-defined]
    got = failure(memo)
    assert got is not None and got[0] == "Forbidden"


def test_a_deleted_network_policy_is_put_back(memo: reconciler.Shared) -> None:
    body = service_body(sandbox=SANDBOX)
    policy = rendered(memo, "NetworkPolicy", body)
    live = copy.deepcopy(policy)
    live["metadata"].update(uid="np-1", resourceVersion="9")
    assert put_back(memo, "DELETED", live, body) == [policy]
    memo.client.applied.clear()  # type: ignore[attr-defined]
    opened = copy.deepcopy(live)
    opened["spec"]["egress"] = [{}]  # everything allowed
    assert put_back(memo, "MODIFIED", opened, body) == [policy]
    memo.client.applied.clear()  # type: ignore[attr-defined]
    assert put_back(memo, "MODIFIED", live, service_body()) == []  # unsealed: reconcile prunes
