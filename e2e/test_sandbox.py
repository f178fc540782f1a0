"""The agent sandbox on real parts: a sandboxed InferenceService's pod runs hardened on the real
kubelet node under the seccomp profile the operator generated and the node agent installed, the
node agent's eBPF enforcer holds its egress to the allowlist (refused and reported otherwise), the
API server accepts its NetworkPolicy, and the service still answers through its ClusterIP.

The real node's CNI (the bridge plugin) does not enforce NetworkPolicies, so here they are only
checked as accepted; what they allow and deny is tested as tables in
``tests/operator/test_sandbox.py``.
"""

import json
from pathlib import Path
from typing import Any

import pytest

from berth import wire
from berth.cluster.cluster import LocalCluster
from berth.cluster.pki import NODE_IP
from berth.e2e.operator_fixtures import OperatorProcess, apply_docs, condition, get_json, wait_for
from berth.e2e.real_node import cluster_ip, ready_pod, real_service, routed_post, tenants
from berth.e2e.sandbox_fixtures import CONNECT, PYTHON, sealed_service

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("needs_real_node")]

# Run in the container: each probe's outcome, "ok" or the errno's name.
PROBES = """
import errno, os

def probe(call):
    try:
        call()
    except OSError as error:
        return errno.errorcode[error.errno]
    return "ok"

def write(path):
    with open(path, "w") as f:
        f.write("x")

print(probe(lambda: os.mkfifo("/tmp/berth-fifo")), probe(lambda: write("/tmp/berth-file")),
      probe(lambda: write("/etc/berth-file")))
"""


def status_line(status: str, field: str) -> str:
    """The value of ``field`` in a /proc/<pid>/status text."""
    (line,) = [x for x in status.splitlines() if x.startswith(f"{field}:")]
    return line.split(":", 1)[1].strip()


def test_a_sandboxed_service_runs_hardened_under_its_seccomp_profile_and_still_serves(
    cluster: LocalCluster,
    operator: OperatorProcess,
    namespace: str,
    tiny_model: Path,
    node_listeners: tuple[int, int],
) -> None:
    allowed, other = node_listeners
    wait_for(
        "earlier tests' pods to leave the real node", lambda: not tenants(cluster), timeout=120
    )
    apply_docs(cluster, [sealed_service("sealed", namespace, tiny_model, port=allowed)])
    pod = wait_for(
        "the sandboxed runtime pod Ready", lambda: ready_pod(cluster, namespace), timeout=240
    )
    name = pod["metadata"]["name"]

    # Hardened as rendered, and the API server kept it so.
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 65532
    profile = security["seccompProfile"]
    assert profile["type"] == "Localhost" and profile["localhostProfile"].startswith("berth/")
    (container,) = pod["spec"]["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    args = container["args"]
    assert args[args.index("--request-timeout") + 1] == "60"

    # The node agent wrote the profile the pod carries where the kubelet looks for it.
    assert cluster.node is not None
    installed = cluster.node.kubelet_root / "seccomp" / profile["localhostProfile"]
    assert installed.read_text() == pod["metadata"]["annotations"][wire.POD_SECCOMP_PROFILE]
    assert "mknodat" in json.loads(installed.read_text())["syscalls"][0]["names"]

    # In the running container: the filter is on, no privilege can be gained, no capability held.
    status = cluster.kubectl("exec", "-n", namespace, name, "--", "cat", "/proc/1/status")
    assert status_line(status, "Seccomp") == "2"  # SECCOMP_MODE_FILTER
    assert status_line(status, "NoNewPrivs") == "1"
    assert int(status_line(status, "CapEff"), 16) == 0
    assert cluster.kubectl("exec", "-n", namespace, name, "--", "id", "-u").strip() == "65532"
    # A denied system call fails with EPERM; /tmp (an emptyDir) is writable, the root is not.
    outcome = cluster.kubectl("exec", "-n", namespace, name, "--", PYTHON, "-c", PROBES).split()
    assert outcome == ["EPERM", "ok", "EROFS"], outcome

    # The API server accepted the NetworkPolicy; it selects the service's pods, both ways.
    policy = get_json(cluster, "networkpolicy", "sealed", "-n", namespace)
    assert policy["spec"]["podSelector"] == {"matchLabels": {wire.LABEL_SERVICE: "sealed"}}
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["metadata"]["ownerReferences"][0]["kind"] == "InferenceService"
    egress = policy["spec"]["egress"]
    assert {"to": [{"ipBlock": {"cidr": f"{NODE_IP}/32"}}],
            "ports": [{"protocol": "TCP", "port": allowed}]} in egress  # fmt: skip

    # The node agent's eBPF enforcer holds the pod to its allowlist, whatever the CNI: the
    # allowed port connects, the other is refused (EPERM) and the denial is reported on the pod.
    pairs = json.dumps([[NODE_IP, allowed], [NODE_IP, other]])

    def enforced() -> list[str] | None:
        met = cluster.kubectl("exec", "-n", namespace, name, "--", PYTHON, "-c", CONNECT,
                              pairs).split()  # fmt: skip
        return met if met[1] != "ok" else None  # attached within a tick of the pod starting

    assert wait_for("the egress enforcer on the pod", enforced, timeout=30) == ["ok", "EPERM"]

    def denied_event() -> list[Any]:
        events = get_json(cluster, "events", "-n", namespace, "--field-selector",
                          f"involvedObject.name={name},reason=EgressDenied")["items"]  # fmt: skip
        return list(events)

    (event, *_) = wait_for("the EgressDenied event on the pod", denied_event, timeout=30)
    assert event["type"] == "Warning" and "refused" in event["message"]

    # It still serves, and nothing in its spec went unheeded.
    ip = cluster_ip(cluster, "sealed", namespace)
    answer = routed_post(f"http://{ip}:8000/v1/completions",
                         {"model": "sealed", "prompt": "Hi", "max_tokens": 4, "temperature": 0})  # fmt: skip
    assert answer["usage"]["completion_tokens"] == 4
    service = get_json(cluster, "bis", "sealed", "-n", namespace)
    kinds = {c["type"] for c in service["status"]["conditions"]}
    assert "FieldsNotActedOn" not in kinds and "HostsNotInNetworkPolicy" not in kinds


def test_egress_hosts_without_cilium_get_a_condition_and_dropping_the_sandbox_prunes_its_policy(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str, tiny_model: Path
) -> None:
    """The local cluster has no Cilium: the host names are in no NetworkPolicy, and the service
    says so. Sandbox off again: its policy goes."""
    hosts = [{"hosts": ["api.example.com"], "ports": [443]}]
    apply_docs(cluster, [sealed_service("hosts", namespace, tiny_model, egress=hosts)])

    def noted() -> dict[str, Any] | None:
        found = condition(get_json(cluster, "bis", "hosts", "-n", namespace),
                          "HostsNotInNetworkPolicy")  # fmt: skip
        return found or None

    found = wait_for("the HostsNotInNetworkPolicy condition", noted, timeout=60)
    assert found["status"] == "True" and found["reason"] == "NoFqdnPolicyEngine"
    assert "api.example.com" in found["message"]
    policy = get_json(cluster, "networkpolicy", "hosts", "-n", namespace)
    assert {"ports": [{"protocol": "TCP", "port": 443}]} in policy["spec"]["egress"]

    apply_docs(cluster, [real_service("hosts", namespace, tiny_model)])

    def pruned() -> bool:
        policies = get_json(cluster, "networkpolicies", "-n", namespace)["items"]
        return not [p for p in policies if p["metadata"]["name"] == "hosts"]

    wait_for("the NetworkPolicy to be pruned", pruned, timeout=60)
    wait_for("the condition to go",
             lambda: not condition(get_json(cluster, "bis", "hosts", "-n", namespace),
                                   "HostsNotInNetworkPolicy"), timeout=60)  # fmt: skip
