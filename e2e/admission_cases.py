"""Specs that admission must refuse, each with the field it must name and the words it must say.

One table serves two tests: ``tests/operator/test_api.py`` checks that the pydantic models refuse
each case (so ``berth plan`` and the reconciler agree with the API server), and
``e2e/test_reconciler_reliability.py`` checks that the real API server refuses it through the
CRD's schema and CEL rules, naming the same field.
"""

from dataclasses import dataclass
from typing import Any

from berth import wire


@dataclass(frozen=True)
class Refused:
    id: str
    spec: dict[str, Any]  # merged over a valid spec
    path: str  # the field the API server names, as it spells it
    says: str  # words the API server's message contains (and pydantic's, unless python_says)
    python_says: str | None = None


def egress(**rule: Any) -> dict[str, Any]:
    return {"sandbox": {"egress": [rule]}}


def pod(**fields: Any) -> dict[str, Any]:
    return {"pod": fields}


REFUSED = [
    Refused("egress cidr not an address", egress(cidrs=["10.0.0.300/8"]),
            "spec.sandbox.egress[0].cidrs[0]", "must be a CIDR"),
    Refused("egress cidr with host bits", egress(cidrs=["10.1.2.3/8"]),
            "spec.sandbox.egress[0].cidrs[0]", "no host bits set"),
    Refused("egress cidr without a prefix length", egress(cidrs=["10.0.0.0"]),
            "spec.sandbox.egress[0].cidrs[0]", "must be a CIDR"),
    Refused("egress cidr IPv4-mapped IPv6", egress(cidrs=["::ffff:10.0.0.0/104"]),
            "spec.sandbox.egress[0].cidrs[0]", "must be a CIDR"),
    Refused("ingress cidr not a CIDR", {"sandbox": {"ingress": [{"cidrs": ["everywhere"]}]}},
            "spec.sandbox.ingress[0].cidrs[0]", "must be a CIDR"),
    Refused("host name with an underscore", egress(hosts=["bad_host.example.com"]),
            "spec.sandbox.egress[0].hosts[0]", "should match"),
    Refused("host name in capitals", egress(hosts=["API.example.com"]),
            "spec.sandbox.egress[0].hosts[0]", "should match"),
    Refused("host that is an address", egress(hosts=["10.0.0.1"]),
            "spec.sandbox.egress[0].hosts[0]", "cidrs"),
    Refused("port zero", egress(ports=[0]),
            "spec.sandbox.egress[0].ports[0]", "greater than or equal to 1"),
    Refused("port above 65535", egress(ports=[65536]),
            "spec.sandbox.egress[0].ports[0]", "less than or equal to 65535"),
    Refused("egress protocol neither TCP nor UDP", egress(protocols=["ICMP"]),
            "spec.sandbox.egress[0].protocols[0]", 'Unsupported value: "ICMP"',
            python_says="Input should be 'TCP' or 'UDP'"),
    Refused("unknown syscall", {"sandbox": {"deniedSyscalls": ["ptrace", "fork_bomb"]}},
            "spec.sandbox.deniedSyscalls[1]", "fork_bomb"),
    Refused("runtime class not a DNS name", {"sandbox": {"runtimeClassName": "Not_A_Name"}},
            "spec.sandbox.runtimeClassName", "should match"),
    Refused("GPU product not a label value", {"gpu": {"fraction": 0.5, "product": "H100 80GB"}},
            "spec.gpu.product", "should match"),
    Refused("zero GPU memory", {"gpu": {"memory": {"request": "0"}}},
            "spec.gpu.memory.request", "positive quantity"),
    Refused("negative GPU memory", {"gpu": {"memory": {"request": "-1Gi"}}},
            "spec.gpu.memory.request", "positive quantity"),
    Refused("zero GPU memory limit", {"gpu": {"memory": {"request": "1Gi", "limit": "0"}}},
            "spec.gpu.memory.limit", "positive quantity"),
    Refused("negative CPU request", pod(resources={"requests": {"cpu": "-1"}}),
            "spec.pod.resources.requests[cpu]", "non-negative quantity"),
    Refused("CPU request above its limit",
            pod(resources={"requests": {"cpu": "4"}, "limits": {"cpu": "1"}}),
            "spec.pod.resources.requests", "must not exceed its limit"),
    Refused("pod resources name the GPU", pod(resources={"limits": {wire.GPU_RESOURCE: "1"}}),
            "spec.pod.resources.limits", wire.GPU_RESOURCE),
    Refused("env overrides the visible devices",
            pod(env=[{"name": wire.ENV_VISIBLE_DEVICES, "value": "all"}]),
            "spec.pod.env[0].name", "cannot be overridden"),
    Refused("env overrides the GPU budget",
            pod(env=[{"name": wire.ENV_GPU_MEMORY_LIMIT, "value": "999999999999"}]),
            "spec.pod.env[0].name", "cannot be overridden"),
    Refused("env overrides the node agent's socket",
            pod(env=[{"name": wire.ENV_AGENT_SOCKET, "value": "/tmp/fake.sock"}]),
            "spec.pod.env[0].name", "cannot be overridden"),
    Refused("env overrides the admin token",
            pod(env=[{"name": wire.ENV_ADMIN_TOKEN, "value": "guessed"}]),
            "spec.pod.env[0].name", "cannot be overridden"),
    Refused("env overrides the pod's name the agent knows it by",
            pod(env=[{"name": "X", "value": "1"}, {"name": wire.ENV_POD_NAME, "value": "other"}]),
            "spec.pod.env[1].name", "cannot be overridden"),
    Refused("annotation marks the pod parked",
            pod(annotations={"example.com/a": "b", wire.POD_STANDBY: "true"}),
            "spec.pod.annotations", "reserved for Berth"),
    Refused("label under Berth's domain", pod(labels={wire.LABEL_ROUTED: "false"}),
            "spec.pod.labels", "reserved for Berth"),
    Refused("env with value and valueFrom",
            pod(env=[{"name": "X", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}]),
            "spec.pod.env[0].valueFrom", "not both"),
    Refused("env name with '='", pod(env=[{"name": "A=B", "value": "1"}]),
            "spec.pod.env[0].name", "should match"),
    Refused("panic window longer than the stable window",
            {"autoscaling": {"stableWindowSeconds": 30, "panicWindowSeconds": 60}},
            "spec.autoscaling.panicWindowSeconds", "must not exceed stableWindowSeconds"),
    Refused("Prometheus metrics without a URL", {"autoscaling": {"metrics": "Prometheus"}},
            "spec.autoscaling.prometheusUrl", "prometheusUrl is required"),
    Refused("a Prometheus URL that is not read", {"autoscaling": {"prometheusUrl": "http://p:9090"}},
            "spec.autoscaling.prometheusUrl", "prometheusUrl is required"),
    Refused("zero target concurrency", {"autoscaling": {"targetConcurrency": 0}},
            "spec.autoscaling.targetConcurrency", "greater than 0"),
    Refused("minReplicas above maxReplicas", {"minReplicas": 3, "maxReplicas": 2},
            "spec.maxReplicas", "maxReplicas must be at least minReplicas"),
    Refused("standby keeps more active replicas than may run",
            {"maxReplicas": 2, "standby": {"minActiveReplicas": 3}},
            "spec.standby.minActiveReplicas", "must not exceed maxReplicas"),
    Refused("negative idle time", {"standby": {"idleSeconds": -1}},
            "spec.standby.idleSeconds", "greater than or equal to 0"),
    Refused("label key with two slashes", pod(labels={"a/b/c": "x"}),
            "spec.pod.labels", "qualified name", python_says="should match"),
    Refused("label value too long", pod(labels={"tier": "x" * 64}),
            "spec.pod.labels.tier", "63"),
    Refused("node selector value with a space", pod(nodeSelector={"pool": "big gpus"}),
            "spec.pod.nodeSelector.pool", "should match"),
    Refused("toleration value with operator Exists",
            pod(tolerations=[{"key": "k", "operator": "Exists", "value": "v"}]),
            "spec.pod.tolerations[0].value", "value must be empty"),
    Refused("toleration with neither key nor Exists", pod(tolerations=[{"value": "v"}]),
            "spec.pod.tolerations[0].operator", "operator must be Exists"),
    Refused("tolerationSeconds without NoExecute",
            pod(tolerations=[{"key": "k", "value": "v", "tolerationSeconds": 5}]),
            "spec.pod.tolerations[0].tolerationSeconds", "needs effect NoExecute"),
    Refused("service account not a DNS name", pod(serviceAccountName="Admin"),
            "spec.pod.serviceAccountName", "should match"),
]  # fmt: skip


# Values next to the refused ones that admission must take.
ACCEPTED: list[dict[str, Any]] = [
    {"sandbox": {"egress": [{"cidrs": ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"]}]}},
    {"sandbox": {"egress": [{"hosts": ["api.openai.com", "*.example.com"], "ports": [443]}]}},
    {"sandbox": {"deniedSyscalls": ["ptrace", "mount", "bpf", "io_uring_setup"]}},
    {"sandbox": {"egress": [{"cidrs": ["10.0.0.0/8"], "ports": [53], "protocols": ["UDP", "TCP"]}]}},
    {"gpu": {"memory": {"request": "512Mi", "limit": "1Gi"}}},
    {"pod": {"resources": {"requests": {"cpu": "0", "memory": "1Gi"}, "limits": {"cpu": "2"}}}},
    {"pod": {"env": [{"name": "HF_HOME", "value": "/cache"}, {"name": "MY.VAR", "value": "x"}]}},
    {"pod": {"labels": {"example.com/team": "ml", "tier": ""}, "nodeSelector": {"a": "b"}}},
    # Berth's domain as a suffix is someone else's; BERTH_PDL is a knob left to the user.
    {"pod": {"annotations": {"team.berth.dev/owner": "ml"}, "env": [{"name": "BERTH_PDL",
                                                                    "value": "0"}]}},
    {"pod": {"tolerations": [{"operator": "Exists"}, {"key": "k", "effect": "NoExecute",
                                                     "tolerationSeconds": 30}]}},
    {"autoscaling": {"metrics": "Prometheus", "prometheusUrl": "http://prom:9090"}},
    {"autoscaling": {"stableWindowSeconds": 60, "panicWindowSeconds": 60}},
    {"maxReplicas": 3, "standby": {"minActiveReplicas": 3}},
]  # fmt: skip


def merged(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``patch`` merged in, dictionaries recursively (a JSON merge patch)."""
    out = dict(base)
    for key, value in patch.items():
        out[key] = (
            merged(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def valid_spec() -> dict[str, Any]:
    return {
        "model": {"source": {"hostPath": {"path": "/models/m"}}},
        "gpu": {"fraction": 0.5},
        "replicas": 1,
        "maxReplicas": 4,
    }


def refused_spec(case: Refused) -> dict[str, Any]:
    spec = merged(valid_spec(), case.spec)
    if "memory" in case.spec.get("gpu", {}):
        del spec["gpu"]["fraction"]
    return spec


def accepted_spec(spec: dict[str, Any]) -> dict[str, Any]:
    base = valid_spec()
    if "memory" in spec.get("gpu", {}):
        del base["gpu"]
    return {**base, **spec}
