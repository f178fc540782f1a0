"""The sandbox's policies against tables of intended allow/deny cases, and its pod hardening.

The NetworkPolicy is judged by ``allows`` below, which reads a policy as the Kubernetes
documentation defines it (rules add up; a rule matches when one of its peers and one of its ports
match; no peers or no ports means all of them; a peer without a namespace selector means the
policy's own namespace), so each row states what a connection meets on a NetworkPolicy-enforcing
cluster.
"""

import hashlib
import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

import click
import pytest

from berth import wire
from berth.operator import api, render, sandbox, seccomp
from berth.operator.settings import OperatorSettings
from berth.runtime.server.cli import serve

SETTINGS = OperatorSettings(runtime_image="registry.local/berth-runtime:test")
NAMESPACE = "team"
OPERATOR_NS = SETTINGS.reservation_namespace
CILIUM = sandbox.PolicyEngines(cilium=True)
TETRAGON = sandbox.PolicyEngines(tetragon=True)

SANDBOX = {
    "enabled": True,
    "egress": [
        {"cidrs": ["10.0.5.0/24"], "ports": [443]},
        {"cidrs": ["192.0.2.7/32"]},
        {"cidrs": ["2001:db8::/32"], "ports": [53], "protocols": ["UDP"]},
    ],
    "ingress": [
        {"namespaceLabels": {"team": "agents"}},
        {"cidrs": ["10.1.0.0/16"]},
        {"podLabels": {"role": "gateway"}},
    ],
    "deniedSyscalls": ["ptrace", "mknodat"],
}
HOSTS = {
    "enabled": True,
    "egress": [
        {"hosts": ["api.example.com", "*.tools.example.com"], "ports": [443]},
        {"cidrs": ["10.0.5.0/24"], "ports": [8080]},
    ],
}


def service(**spec: Any) -> api.InferenceService:
    base: dict[str, Any] = {
        "model": {"source": {"pvc": {"claimName": "models", "path": "llama"}}},
        "gpu": {"fraction": 0.25},
    }
    return api.InferenceService.model_validate(
        {"metadata": {"name": "agent", "namespace": NAMESPACE, "uid": "u-1"},
         "spec": {**base, **spec}}
    )  # fmt: skip


def rendered(spec_sandbox: dict[str, Any], engines: sandbox.PolicyEngines) -> dict[str, Any]:
    """The service's objects by kind."""
    objects = render.render(service(sandbox=spec_sandbox), SETTINGS, engines)
    return {o["kind"]: o for o in objects}


# ---- a NetworkPolicy reader -----------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """The other end of a connection: an address outside the cluster, or a pod."""

    ip: str | None = None
    namespace: str | None = None  # a pod's namespace
    labels: dict[str, str] = field(default_factory=dict)
    namespace_labels: dict[str, str] = field(default_factory=dict)


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # the renderer writes nothing else
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _peer_matches(rule_peer: dict[str, Any], peer: Peer) -> bool:
    if "ipBlock" in rule_peer:
        block = rule_peer["ipBlock"]
        if peer.ip is None:
            return False
        address = ipaddress.ip_address(peer.ip)
        network = ipaddress.ip_network(block["cidr"])
        excepted = [ipaddress.ip_network(e) for e in block.get("except", [])]
        return (
            address.version == network.version
            and address in network
            and not any(address in e for e in excepted)
        )
    if peer.namespace is None:
        return False
    if "namespaceSelector" in rule_peer:
        ns_labels = {**peer.namespace_labels, sandbox.NAMESPACE_LABEL: peer.namespace}
        if not _selects(rule_peer["namespaceSelector"], ns_labels):
            return False
    elif peer.namespace != NAMESPACE:
        return False
    return _selects(rule_peer.get("podSelector", {}), peer.labels)


def allows(policy: dict[str, Any], direction: str, peer: Peer, port: int, protocol: str) -> bool:
    spec = policy["spec"]
    assert direction.capitalize() in spec["policyTypes"]
    for rule in spec.get(direction, []):
        peers = rule.get("to" if direction == "egress" else "from")
        if peers and not any(_peer_matches(p, peer) for p in peers):
            continue
        ports = rule.get("ports")
        if ports and not any(
            p["protocol"] == protocol and p.get("port") in (None, port) for p in ports
        ):
            continue
        return True
    return False


DNS = Peer(namespace="kube-system", labels={"k8s-app": "kube-dns"})
OPERATOR = Peer(namespace=OPERATOR_NS, labels={"app.kubernetes.io/name": "berth-operator"})

EGRESS_CASES = [
    ("allowlisted CIDR and port", Peer(ip="10.0.5.9"), 443, "TCP", True),
    ("allowlisted CIDR, other port", Peer(ip="10.0.5.9"), 80, "TCP", False),
    ("allowlisted CIDR and port over UDP", Peer(ip="10.0.5.9"), 443, "UDP", False),
    ("address next to the CIDR", Peer(ip="10.0.6.1"), 443, "TCP", False),
    ("a /32 without ports: any TCP port", Peer(ip="192.0.2.7"), 22, "TCP", True),
    ("the address beside the /32", Peer(ip="192.0.2.8"), 22, "TCP", False),
    ("IPv6 CIDR on its UDP port", Peer(ip="2001:db8::1"), 53, "UDP", True),
    ("IPv6 CIDR on its port over TCP", Peer(ip="2001:db8::1"), 53, "TCP", False),
    ("cluster DNS over UDP", DNS, 53, "UDP", True),
    ("cluster DNS over TCP", DNS, 53, "TCP", True),
    ("cluster DNS pods on another port", DNS, 8080, "TCP", False),
    ("a kube-dns look-alike in a tenant namespace", Peer(namespace="evil", labels={"k8s-app": "kube-dns"}), 53, "UDP", False),
    ("a public resolver", Peer(ip="8.8.8.8"), 53, "UDP", False),
    ("a pod beside it", Peer(namespace=NAMESPACE, labels={"app": "db"}), 5432, "TCP", False),
    ("the internet", Peer(ip="93.184.216.34"), 443, "TCP", False),
]  # fmt: skip
INGRESS_CASES = [
    ("a pod of an allowed namespace", Peer(namespace="agents-1", namespace_labels={"team": "agents"}), 8000, True),
    ("an allowed namespace on another port", Peer(namespace="agents-1", namespace_labels={"team": "agents"}), 9000, False),
    ("an allowed CIDR", Peer(ip="10.1.2.3"), 8000, True),
    ("beside the allowed CIDR", Peer(ip="10.2.0.1"), 8000, False),
    ("an allowed pod label in the service's namespace", Peer(namespace=NAMESPACE, labels={"role": "gateway"}), 8000, True),
    ("the same label in another namespace", Peer(namespace="other", labels={"role": "gateway"}), 8000, False),
    ("Berth's operator (metrics)", OPERATOR, 8000, True),
    ("an operator look-alike elsewhere", Peer(namespace="evil", labels={"app.kubernetes.io/name": "berth-operator"}), 8000, False),
    ("any other pod", Peer(namespace=NAMESPACE, labels={"app": "web"}), 8000, False),
]  # fmt: skip


@pytest.mark.parametrize(("case", "peer", "port", "protocol", "allowed"), EGRESS_CASES)
def test_egress_is_denied_but_for_the_allowlist_and_the_cluster_dns(
    case: str, peer: Peer, port: int, protocol: str, allowed: bool
) -> None:
    policy = rendered(SANDBOX, sandbox.NO_ENGINES)["NetworkPolicy"]
    assert allows(policy, "egress", peer, port, protocol) is allowed, case


@pytest.mark.parametrize(("case", "peer", "port", "allowed"), INGRESS_CASES)
def test_ingress_is_denied_but_for_the_allowed_sources_and_the_operator(
    case: str, peer: Peer, port: int, allowed: bool
) -> None:
    policy = rendered(SANDBOX, sandbox.NO_ENGINES)["NetworkPolicy"]
    assert allows(policy, "ingress", peer, port, "TCP") is allowed, case


def test_an_empty_sandbox_denies_everything_but_dns_and_the_operator() -> None:
    policy = rendered({"enabled": True}, sandbox.NO_ENGINES)["NetworkPolicy"]
    assert allows(policy, "egress", DNS, 53, "UDP")
    assert not allows(policy, "egress", Peer(ip="10.0.0.1"), 443, "TCP")
    assert allows(policy, "ingress", OPERATOR, render.PORT, "TCP")
    assert not allows(policy, "ingress", Peer(ip="10.0.0.1"), render.PORT, "TCP")


def test_the_policy_selects_the_services_pods_and_is_owned_by_it() -> None:
    policy = rendered(SANDBOX, sandbox.NO_ENGINES)["NetworkPolicy"]
    labels = render.deployment(service(sandbox=SANDBOX), SETTINGS)["spec"]["template"]["metadata"]
    assert _selects(policy["spec"]["podSelector"], labels["labels"])
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert policy["metadata"]["namespace"] == NAMESPACE


def test_a_disabled_sandbox_renders_no_policy() -> None:
    off = {**SANDBOX, "enabled": False}
    kinds = {o["kind"] for o in render.render(service(sandbox=off), SETTINGS, CILIUM)}
    assert kinds == {"Deployment", "Service"}


# ---- host names ---------------------------------------------------------------------------


def test_without_cilium_host_rules_open_their_ports_to_any_address_and_a_condition_says_so() -> (
    None
):
    objects = rendered(HOSTS, sandbox.NO_ENGINES)
    assert "CiliumNetworkPolicy" not in objects
    policy = objects["NetworkPolicy"]
    assert allows(policy, "egress", Peer(ip="203.0.113.5"), 443, "TCP")  # the eBPF layer narrows
    assert not allows(policy, "egress", Peer(ip="203.0.113.5"), 80, "TCP")
    assert allows(policy, "egress", Peer(ip="10.0.5.1"), 8080, "TCP")
    note = sandbox.hosts_note(service(sandbox=HOSTS).spec.sandbox, sandbox.NO_ENGINES)
    assert note is not None and "*.tools.example.com, api.example.com" in note
    assert sandbox.CILIUM_CRD in note
    assert note.endswith("it refuses *.tools.example.com (a wildcard cannot be resolved)")


def test_with_cilium_hosts_go_to_fqdn_rules_only_and_no_condition() -> None:
    objects = rendered(HOSTS, CILIUM)
    policy = objects["NetworkPolicy"]
    assert not allows(policy, "egress", Peer(ip="203.0.113.5"), 443, "TCP")
    assert allows(policy, "egress", Peer(ip="10.0.5.1"), 8080, "TCP")
    cilium = objects["CiliumNetworkPolicy"]
    assert cilium["spec"]["endpointSelector"] == policy["spec"]["podSelector"]
    dns, fqdn = cilium["spec"]["egress"]
    assert dns["toPorts"][0]["rules"] == {"dns": [{"matchPattern": "*"}]}
    assert fqdn["toFQDNs"] == [
        {"matchName": "api.example.com"},
        {"matchPattern": "*.tools.example.com"},
    ]
    assert fqdn["toPorts"] == [{"ports": [{"port": "443", "protocol": "TCP"}]}]
    assert sandbox.hosts_note(service(sandbox=HOSTS).spec.sandbox, CILIUM) is None


def test_cilium_gets_no_policy_when_no_rule_names_a_host() -> None:
    assert "CiliumNetworkPolicy" not in rendered(SANDBOX, CILIUM)
    assert sandbox.hosts_note(service(sandbox=SANDBOX).spec.sandbox, sandbox.NO_ENGINES) is None


# ---- Tetragon -----------------------------------------------------------------------------


def test_tetragon_overrides_the_users_denied_syscalls_with_eperm() -> None:
    assert "TracingPolicyNamespaced" not in rendered(SANDBOX, sandbox.NO_ENGINES)
    tracing = rendered(SANDBOX, TETRAGON)["TracingPolicyNamespaced"]
    spec = tracing["spec"]
    assert spec["podSelector"] == {"matchLabels": {wire.LABEL_SERVICE: "agent"}}
    assert spec["lists"][0]["values"] == ["sys_mknodat", "sys_ptrace"]
    (kprobe,) = spec["kprobes"]
    assert kprobe["call"] == "list:denied" and kprobe["syscall"] is True
    assert kprobe["selectors"][0]["matchActions"] == [{"action": "Override", "argError": -1}]
    assert "TracingPolicyNamespaced" not in rendered({"enabled": True}, TETRAGON)


# ---- pod hardening ------------------------------------------------------------------------


def pod_template(spec_sandbox: dict[str, Any] | None, **spec: Any) -> dict[str, Any]:
    s = service(sandbox=spec_sandbox, **spec) if spec_sandbox else service(**spec)
    template: dict[str, Any] = render.deployment(s, SETTINGS)["spec"]["template"]
    return template


def test_a_sandboxed_pod_runs_hardened_under_its_generated_seccomp_profile() -> None:
    template = pod_template(SANDBOX)
    pod = template["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == sandbox.RUNTIME_USER
    profile = pod["securityContext"]["seccompProfile"]
    text = template["metadata"]["annotations"][wire.POD_SECCOMP_PROFILE]
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert profile == {"type": "Localhost", "localhostProfile": f"berth/{digest}.json"}
    assert text == seccomp.profile_json(["ptrace", "mknodat"])
    egress = json.loads(template["metadata"]["annotations"][wire.POD_EGRESS_POLICY])
    assert [api.EgressRule.model_validate(r) for r in egress] == service(
        sandbox=SANDBOX
    ).spec.sandbox.egress  # type: ignore[union-attr]
    (container,) = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
    }
    writable = {m["mountPath"] for m in container["volumeMounts"] if m.get("readOnly") is not True}
    assert writable == {"/tmp", sandbox.RUNTIME_HOME}
    emptied = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    assert {m["name"] for m in container["volumeMounts"] if m["mountPath"] in writable} <= emptied


def test_the_model_fetcher_is_hardened_too() -> None:
    pod = pod_template(SANDBOX, model={"source": {"uri": "https://example.com/m.tar"}})["spec"]
    (fetch,) = pod["initContainers"]
    assert fetch["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in fetch["volumeMounts"]


def test_without_an_enabled_sandbox_the_pod_is_not_hardened_but_keeps_its_runtime_class() -> None:
    for spec_sandbox in (None, {**SANDBOX, "enabled": False, "runtimeClassName": "gvisor"}):
        template = pod_template(spec_sandbox)
        pod = template["spec"]
        assert "securityContext" not in pod
        assert "securityContext" not in pod["containers"][0]
        assert wire.POD_SECCOMP_PROFILE not in template["metadata"]["annotations"]
        assert wire.POD_EGRESS_POLICY not in template["metadata"]["annotations"]
    assert pod["runtimeClassName"] == "gvisor"


# ---- maxRequestSeconds ------------------------------------------------------------------------


def serve_params(args: list[str]) -> dict[str, Any]:
    """What ``berth serve`` makes of the rendered arguments (parsed, not run)."""
    assert args[0] == "serve"
    with click.Context(serve) as ctx:
        serve.parse_args(ctx, list(args[1:]))
        params: dict[str, Any] = ctx.params
    return params


@pytest.mark.parametrize("enabled", [True, False])
def test_max_request_seconds_is_the_runtimes_request_timeout(enabled: bool) -> None:
    spec_sandbox = {"enabled": enabled, "maxRequestSeconds": 120}
    container = pod_template(spec_sandbox)["spec"]["containers"][0]
    assert serve_params(container["args"])["request_timeout_s"] == 120.0


def test_without_max_request_seconds_the_runtime_keeps_its_default_timeout() -> None:
    container = pod_template(SANDBOX)["spec"]["containers"][0]
    assert "--request-timeout" not in container["args"]
    default = next(p for p in serve.params if p.name == "request_timeout_s").default
    assert serve_params(container["args"])["request_timeout_s"] == default
