"""``policies(...)`` and ``hardening(...)``: what ``spec.sandbox`` (``enabled: true``) renders.

Pure: the parsed sandbox in, plain dicts out; ``render.py`` adds them to a service's objects and
pod template. The layers (ARCHITECTURE section 7), each on its own where the others are missing:

1. A ``NetworkPolicy`` selecting the service's pods, for ingress and egress, so both default to
   deny: egress to the cluster DNS (kube-system's ``k8s-app: kube-dns`` pods, port 53 over UDP and
   TCP) and to each egress rule's CIDRs on its ports and protocols; ingress to the runtime's port
   from each ingress rule's sources and from Berth's operator (the autoscaler reads every pod's
   ``/metrics``; a Prometheus that scrapes the pods needs an ingress rule of its own). Kubelet
   probes come from the node, which NetworkPolicy implementations let in. An empty rule means
   "anywhere" (for egress, on its ports), as in a NetworkPolicy. A ``uri`` model source is
   downloaded from inside the pod: its host needs an egress rule too.
2. Host names cannot be said in a NetworkPolicy. With Cilium's CRDs a ``CiliumNetworkPolicy``
   allows them (``toFQDNs``, with DNS through Cilium's proxy so it learns the addresses) and the
   NetworkPolicy leaves them out, since allow rules add up and a wider one would void it. Without
   Cilium the NetworkPolicy allows a host rule's ports to any address, and only the node agent's
   eBPF enforcer, which resolves the names, holds the pod to them: ``hosts_note`` says so in a
   status condition.
3. With Tetragon's CRD, a ``TracingPolicyNamespaced`` (namespaced, so the service can own it)
   overrides the user's denied system calls with EPERM in the kernel and reports each attempt.
   Only the user's names: Tetragon attaches a kprobe per call, and the baseline of the seccomp
   profile names calls that some kernels do not build.
4. Pod hardening: non-root (Berth's runtime image user, 65532), read-only root filesystem with
   emptyDirs where the runtime writes (``/tmp``: the tiny model, Torch's and Hugging Face's caches
   under ``XDG_CACHE_HOME=/tmp/cache``; the image's home: Triton's cache), no privilege escalation,
   every capability dropped, and the seccomp ``Localhost`` profile of ``seccomp.py``, carried to
   the node in the pod annotation ``wire.POD_SECCOMP_PROFILE``; the egress rules go along in
   ``wire.POD_EGRESS_POLICY`` for the node agent's eBPF enforcer (``runtime/agent/pod_egress.py``).
"""

import json
from dataclasses import dataclass
from typing import Any

from berth import wire
from berth.operator import seccomp
from berth.operator.api import EgressRule, IngressRule, SandboxSpec

Obj = dict[str, Any]

CILIUM_CRD = "ciliumnetworkpolicies.cilium.io"
TETRAGON_CRD = "tracingpoliciesnamespaced.cilium.io"
NAMESPACE_LABEL = "kubernetes.io/metadata.name"  # set by the API server on every namespace
DNS_NAMESPACE = "kube-system"
DNS_POD_LABELS = {"k8s-app": "kube-dns"}  # CoreDNS and kube-dns alike
OPERATOR_POD_LABELS = {"app.kubernetes.io/name": "berth-operator"}  # the chart's selector
RUNTIME_USER = 65532  # the user of Berth's runtime image
RUNTIME_HOME = "/home/berth"  # and its HOME
WRITABLE = {"tmp": "/tmp", "home": RUNTIME_HOME}  # emptyDir name -> mount path


@dataclass(frozen=True)
class PolicyEngines:
    """Which policy engines the cluster has, by their CRDs (looked up at the operator's start)."""

    cilium: bool = False
    tetragon: bool = False


NO_ENGINES = PolicyEngines()  # plain Kubernetes: NetworkPolicy only
NETWORK_POLICY = ("networking.k8s.io/v1", "NetworkPolicy")
CILIUM_POLICY = ("cilium.io/v2", "CiliumNetworkPolicy")
TRACING_POLICY = ("cilium.io/v1alpha1", "TracingPolicyNamespaced")


def policy_kinds(engines: PolicyEngines) -> list[tuple[str, str]]:
    """(apiVersion, kind) of every policy ``policies`` may render on a cluster with ``engines``."""
    return [NETWORK_POLICY] + [CILIUM_POLICY] * engines.cilium + [TRACING_POLICY] * engines.tetragon


def _selector(name: str) -> Obj:
    return {"matchLabels": {wire.LABEL_SERVICE: name}}


def _dns_peer() -> Obj:
    return {
        "namespaceSelector": {"matchLabels": {NAMESPACE_LABEL: DNS_NAMESPACE}},
        "podSelector": {"matchLabels": dict(DNS_POD_LABELS)},
    }


def _ports(rule: EgressRule) -> list[Obj]:
    """A rule's ports per protocol; a protocol alone (no port) means all its ports."""
    if not rule.ports:
        return [{"protocol": p} for p in rule.protocols]
    return [{"protocol": p, "port": port} for port in rule.ports for p in rule.protocols]


def _egress_rule(rule: EgressRule, engines: PolicyEngines) -> Obj | None:
    """One egress rule of the NetworkPolicy, or None when only the Cilium policy can say it."""
    peers = [{"ipBlock": {"cidr": cidr}} for cidr in rule.cidrs]
    if rule.hosts and not engines.cilium:
        peers = []  # any address on these ports: the eBPF enforcer narrows it to the hosts
    elif rule.hosts and not peers:
        return None
    out: Obj = {"ports": _ports(rule)}
    if peers:
        out["to"] = peers
    return out


def _ingress_peers(rule: IngressRule) -> list[Obj]:
    """A rule's sources: each CIDR, and the pods matching both label sets (pod labels alone:
    pods of the service's own namespace, as in a NetworkPolicy)."""
    peers: list[Obj] = [{"ipBlock": {"cidr": cidr}} for cidr in rule.cidrs]
    if rule.namespace_labels or rule.pod_labels:
        peer: Obj = {}
        if rule.namespace_labels:
            peer["namespaceSelector"] = {"matchLabels": dict(rule.namespace_labels)}
        if rule.pod_labels:
            peer["podSelector"] = {"matchLabels": dict(rule.pod_labels)}
        peers.append(peer)
    return peers


def network_policy(
    sandbox: SandboxSpec, meta: Obj, engines: PolicyEngines, port: int, operator_namespace: str
) -> Obj:
    """Default deny both ways for the service's pods, with the allowlists and DNS."""
    egress: list[Obj] = [
        {"to": [_dns_peer()], "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
    ]  # fmt: skip
    egress += [r for rule in sandbox.egress if (r := _egress_rule(rule, engines)) is not None]
    served = [{"protocol": "TCP", "port": port}]
    operator = {
        "namespaceSelector": {"matchLabels": {NAMESPACE_LABEL: operator_namespace}},
        "podSelector": {"matchLabels": dict(OPERATOR_POD_LABELS)},
    }
    ingress: list[Obj] = [{"from": [operator], "ports": served}]
    for rule in sandbox.ingress:
        peers = _ingress_peers(rule)
        ingress.append({"from": peers, "ports": served} if peers else {"ports": served})
    return {
        "apiVersion": NETWORK_POLICY[0],
        "kind": NETWORK_POLICY[1],
        "metadata": dict(meta),
        "spec": {
            "podSelector": _selector(meta["name"]),
            "policyTypes": ["Ingress", "Egress"],
            "ingress": ingress,
            "egress": egress,
        },
    }


def _fqdn(host: str) -> Obj:
    return {"matchPattern": host} if host.startswith("*.") else {"matchName": host}


def cilium_policy(sandbox: SandboxSpec, meta: Obj) -> Obj | None:
    """The egress rules with host names, as ``toFQDNs``; None when no rule names a host. DNS
    goes through Cilium's proxy (the ``dns`` rule), which is how Cilium learns the addresses."""
    rules: list[Obj] = []
    for rule in (r for r in sandbox.egress if r.hosts):
        out: Obj = {"toFQDNs": [_fqdn(host) for host in rule.hosts]}
        numbers = [str(port) for port in rule.ports] or ["0"]  # "0": every port
        out["toPorts"] = [
            {"ports": [{"port": n, "protocol": p} for n in numbers for p in rule.protocols]}
        ]
        rules.append(out)
    if not rules:
        return None
    dns = {
        "toEndpoints": [{"matchLabels": {
            "k8s:io.kubernetes.pod.namespace": DNS_NAMESPACE,
            **{f"k8s:{k}": v for k, v in DNS_POD_LABELS.items()},
        }}],
        "toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}],
                     "rules": {"dns": [{"matchPattern": "*"}]}}],
    }  # fmt: skip
    return {
        "apiVersion": CILIUM_POLICY[0],
        "kind": CILIUM_POLICY[1],
        "metadata": dict(meta),
        "spec": {"endpointSelector": _selector(meta["name"]), "egress": [dns, *rules]},
    }


def tracing_policy(sandbox: SandboxSpec, meta: Obj) -> Obj | None:
    """Tetragon: the user's denied system calls return EPERM (``Override``) and are reported;
    None when the user denies none."""
    if not sandbox.denied_syscalls:
        return None
    names = sorted(set(sandbox.denied_syscalls))
    return {
        "apiVersion": TRACING_POLICY[0],
        "kind": TRACING_POLICY[1],
        "metadata": dict(meta),
        "spec": {
            "podSelector": _selector(meta["name"]),
            "lists": [{"name": "denied", "type": "syscalls", "values": [f"sys_{n}" for n in names]}],
            "kprobes": [{
                "call": "list:denied",
                "syscall": True,
                "selectors": [{"matchActions": [{"action": "Override", "argError": -seccomp.EPERM}]}],
            }],
        },
    }  # fmt: skip


def policies(
    sandbox: SandboxSpec, meta: Obj, engines: PolicyEngines, port: int, operator_namespace: str
) -> list[Obj]:
    """The sandbox's policy objects, each with ``meta`` (name, namespace, labels, owner)."""
    if not sandbox.enabled:
        return []
    objects = [network_policy(sandbox, meta, engines, port, operator_namespace)]
    if engines.cilium and (cilium := cilium_policy(sandbox, meta)) is not None:
        objects.append(cilium)
    if engines.tetragon and (tetragon := tracing_policy(sandbox, meta)) is not None:
        objects.append(tetragon)
    return objects


def hosts_note(sandbox: SandboxSpec | None, engines: PolicyEngines) -> str | None:
    """Why the egress host names are in no NetworkPolicy, for a status condition; None when
    no enabled sandbox names a host or Cilium's policy names them."""
    if sandbox is None or not sandbox.enabled or engines.cilium:
        return None
    hosts = sorted({host for rule in sandbox.egress for host in rule.hosts})
    if not hosts:
        return None
    note = (
        f"egress to {', '.join(hosts)}: a NetworkPolicy cannot name hosts and Cilium's "
        f"{CILIUM_CRD} is not installed, so the NetworkPolicy allows those rules' ports to any "
        "address; only Berth's node agent (its eBPF egress enforcer) holds the pods to the names"
    )
    wildcards = [host for host in hosts if host.startswith("*.")]
    if wildcards:  # the enforcer resolves names ahead of the pod; a wildcard has no answer
        note += f", and it refuses {', '.join(wildcards)} (a wildcard cannot be resolved)"
    return note


def egress_json(sandbox: SandboxSpec) -> str:
    """The egress rules as the node agent's enforcer reads them (``wire.POD_EGRESS_POLICY``)."""
    rules = [rule.model_dump(by_alias=True) for rule in sandbox.egress]
    return json.dumps(rules, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Hardening:
    """What a sandboxed pod template gets: securityContexts, writable emptyDirs, the profile."""

    pod_security_context: Obj
    container_security_context: Obj
    volumes: list[Obj]
    mounts: list[Obj]
    annotations: dict[str, str]


def hardening(sandbox: SandboxSpec | None) -> Hardening | None:
    """The pod hardening of an enabled sandbox; None otherwise."""
    if sandbox is None or not sandbox.enabled:
        return None
    profile = seccomp.profile_json(sandbox.denied_syscalls)
    pod = {
        "runAsNonRoot": True,
        "runAsUser": RUNTIME_USER,
        "runAsGroup": RUNTIME_USER,
        "seccompProfile": {"type": "Localhost", "localhostProfile": seccomp.profile_name(profile)},
    }
    container = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
    }
    return Hardening(
        pod_security_context=pod,
        container_security_context=container,
        volumes=[{"name": name, "emptyDir": {}} for name in WRITABLE],
        mounts=[{"name": name, "mountPath": path} for name, path in WRITABLE.items()],
        annotations={
            wire.POD_SECCOMP_PROFILE: profile,
            wire.POD_EGRESS_POLICY: egress_json(sandbox),
        },
    )
