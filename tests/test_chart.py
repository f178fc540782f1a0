"""The Helm chart rendered by the real ``helm`` (the project's pinned v3.19.0): lint, values that
the schema refuses, what each value changes, the node agent's privileges, namespaced RBAC, and a
dashboard whose every metric name is one the code exports. The API server's own check of every
rendered object is end to end (``e2e/test_chart.py``)."""

import json
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from berth.cluster.toolchain import ToolchainError, ensure_binaries
from berth.e2e import prometheus
from berth.operator.metrics import OperatorMetrics
from berth.runtime.agent import metrics as agent_metrics
from berth.runtime.server import metrics as runtime_metrics

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "berth"
Obj = dict[str, Any]
NON_DEFAULT: Obj = yaml.safe_load((CHART / "ci" / "non-default-values.yaml").read_text())


@pytest.fixture(scope="module")
def helm() -> Path:
    """The pinned helm, built with the control plane on first use (`make toolchain`) as the local
    cluster's is; instant when cached."""
    try:
        return ensure_binaries() / "helm"
    except ToolchainError as error:
        pytest.skip(f"no helm: {error}")


def run_helm(helm: Path, *args: str, values: Obj | None = None) -> subprocess.CompletedProcess[str]:
    """``helm ARGS CHART``, with ``values`` (if any) as a values file on stdin."""
    command = [str(helm), *args, str(CHART), *(["--values", "-"] if values is not None else [])]
    stdin = yaml.safe_dump(values) if values is not None else None
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=60)


def render(helm: Path, values: Obj | None = None, *flags: str) -> list[Obj]:
    result = run_helm(
        helm, "template", "berth", "--namespace", "berth-system", *flags, values=values
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(objects: Iterable[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def test_lint_default_and_non_default(helm: Path) -> None:
    for values in (None, NON_DEFAULT):
        result = run_helm(helm, "lint", "--strict", values=values)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("values", "refusal"),
    [
        ({"replicas": 0}, "replicas"),
        ({"replicas": "2"}, "replicas"),
        ({"nodeAgent": {"gpuReserve": "lots"}}, "gpuReserve"),
        ({"nodeAgent": {"clusterDNS": ["cluster.local"]}}, "clusterDNS"),
        ({"nodeAgent": {"logLevel": "trace"}}, "logLevel"),
        ({"watchNamespaces": ["Team_A"]}, "watchNamespaces"),
        ({"metrics": {"serviceMonitor": {"interval": "soon"}}}, "interval"),
        ({"nodeAgent": {"privileged": True}}, "privileged"),  # unknown keys are refused
    ],
)
def test_schema_refuses(helm: Path, values: Obj, refusal: str) -> None:
    result = run_helm(helm, "template", "berth", values=values)
    assert result.returncode != 0
    assert refusal in result.stderr


def test_service_monitor_needs_the_service(helm: Path) -> None:
    values = {"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}}
    result = run_helm(helm, "template", "berth", values=values)
    assert result.returncode != 0
    assert "needs metrics.service.enabled" in result.stderr


def test_defaults(helm: Path) -> None:
    objects = render(helm)
    kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objects)
    assert kinds == [
        "ClusterRole/berth-node-agent", "ClusterRole/berth-operator",
        "ClusterRoleBinding/berth-node-agent", "ClusterRoleBinding/berth-operator",
        "DaemonSet/berth-node-agent", "Deployment/berth-operator", "Pod/berth-operator-test",
        "Role/berth-operator-leader", "Role/berth-operator-reservations",
        "Role/berth-operator-test", "RoleBinding/berth-operator-leader",
        "RoleBinding/berth-operator-reservations", "RoleBinding/berth-operator-test",
        "Service/berth-operator-metrics", "ServiceAccount/berth-node-agent",
        "ServiceAccount/berth-operator", "ServiceAccount/berth-operator-test",
    ]  # fmt: skip
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert "priorityClassName" not in pod and "imagePullSecrets" not in pod
    assert pod["containers"][0]["image"] == "ghcr.io/berth-dev/berth-operator:0.1.0"
    # The agent runs from the runtime image: the operator's lacks the agent's server.
    agent = one(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
    assert agent["image"] == "ghcr.io/berth-dev/berth-runtime:0.1.0"
    service = one(objects, "Service")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    test = one(objects, "Pod")
    assert test["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert test["spec"]["serviceAccountName"] == "berth-operator-test"
    assert test["spec"]["containers"][0]["args"] == [
        "smoke-test", "--namespace=berth-system", "--operator-service=berth-operator-metrics",
        "--operator-port=8081", "--timeout=300", "--name=berth-operator-smoke-test",
        "--fraction=0.1", "--pod={}",
    ]  # fmt: skip
    # The test's own rights: the two Services' addresses and its own InferenceService.
    rules = rules_of(one(objects, "Role", "berth-operator-test"))
    assert rules == {("", "services", "get")} | {
        ("berth.dev", "inferenceservices", verb) for verb in ("get", "create", "patch", "delete")
    }
    hooks = [o for o in objects if o["metadata"].get("annotations", {}).get("helm.sh/hook")]
    assert len(hooks) == 4 and all(o["metadata"]["name"] == "berth-operator-test" for o in hooks)


def test_helm_test_can_check_the_operator_alone(helm: Path) -> None:
    objects = render(helm, {"tests": {"inferenceService": {"enabled": False}}})
    args = one(objects, "Pod")["spec"]["containers"][0]["args"]
    assert args[-1] == "--operator-only" and not [a for a in args if a.startswith("--pod")]


def test_non_default_values_reach_the_objects(helm: Path) -> None:
    objects = render(helm, NON_DEFAULT)
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert deployment["spec"]["replicas"] == 3
    assert (
        deployment["spec"]["template"]["metadata"]["annotations"] == NON_DEFAULT["podAnnotations"]
    )
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    assert pod["affinity"] == NON_DEFAULT["affinity"]
    assert pod["tolerations"] == NON_DEFAULT["tolerations"]
    assert container["image"] == "registry.example/berth:9.9.9"
    assert container["args"] == ["operator", "--namespace=team-a", "--namespace=team-b"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["BERTH_HEALTH_PORT"] == "9090" and env["BERTH_GPU_RESERVE_MIB"] == "1024"
    assert container["ports"][0]["containerPort"] == 9090
    monitor = one(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "15s"}
    ]
    dashboard = one(objects, "ConfigMap", "berth-dashboard")
    assert dashboard["metadata"]["namespace"] == "monitoring"
    test_args = one(objects, "Pod")["spec"]["containers"][0]["args"]
    assert "--fraction=0.25" in test_args and "--timeout=600" in test_args
    assert '--pod={"nodeSelector":{"example.com/gpu":"yes"}}' in test_args
    agent = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    assert agent["containers"][0]["image"] == "registry.example/berth-agent:9.9.9"
    assert "runtimeClassName" not in agent and "priorityClassName" not in agent
    assert agent["nodeSelector"] == {"example.com/gpu": "yes"}
    agent_env = {e["name"]: e.get("value") for e in agent["containers"][0]["env"]}
    assert agent_env["BERTH_CLUSTER_DNS"] == "10.96.0.10,fd00::a"
    assert agent_env["BERTH_GPU_RESERVE"] == "1Gi"
    assert "--seccomp-dir=/var/lib/k0s/kubelet/seccomp" in agent["containers"][0]["args"]
    assert "--simulate-gpus=GPU-0a1b:80Gi,GPU-2c3d:40Gi" in agent["containers"][0]["args"]
    assert "--metrics-port=19401" in agent["containers"][0]["args"]
    assert agent["containers"][0]["ports"] == [
        {"name": "metrics", "containerPort": 19401, "protocol": "TCP"}
    ]
    # Prometheus scrapes the runtimes (in the watched namespaces) and the agents directly.
    runtimes = one(objects, "PodMonitor", "berth-runtimes")["spec"]
    assert runtimes["selector"] == {"matchLabels": {"app.kubernetes.io/managed-by": "berth"}}
    assert runtimes["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    assert runtimes["podMetricsEndpoints"][0]["port"] == "http"
    agents = one(objects, "PodMonitor", "berth-node-agent")["spec"]
    assert (
        agents["selector"]["matchLabels"].items()
        <= one(objects, "DaemonSet")["spec"]["template"]["metadata"]["labels"].items()
    )
    assert agents["podMetricsEndpoints"][0] == {"port": "metrics", "path": "/metrics",
                                                "interval": "15s"}  # fmt: skip


def agent_pod(objects: list[Obj]) -> Obj:
    spec: Obj = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    return spec


def test_node_agent_privileges_are_exactly_the_named_ones(helm: Path) -> None:
    pod = agent_pod(render(helm))
    container = pod["containers"][0]
    security = container["securityContext"]
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    assert "privileged" not in security and security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["BPF", "NET_ADMIN", "SYS_ADMIN"]}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host_paths == {
        "socket": "/run/berth/agent",
        "seccomp": "/var/lib/kubelet/seccomp",
        "bpffs": "/sys/fs/bpf",
        "cgroup": "/sys/fs/cgroup",
    }
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["cgroup"]["readOnly"] is True
    assert "mountPropagation" not in mounts["bpffs"]  # works on private host mounts too
    # No GPU taken from the tenants: NVML through the NVIDIA runtime's utility capability only.
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "utility" and pod["runtimeClassName"] == "nvidia"
    assert "--socket=/run/berth/agent/agent.sock" in container["args"]
    probe = container["readinessProbe"]["exec"]["command"]
    assert "connect('/run/berth/agent/agent.sock')" in probe[-1]
    assert pod["priorityClassName"] == "system-node-critical"
    # Metrics on the pod's own address (no hostNetwork, no hostPort); real GPUs through NVML.
    assert container["ports"] == [{"name": "metrics", "containerPort": 9401, "protocol": "TCP"}]
    assert "--metrics-port=9401" in container["args"]
    assert not [a for a in container["args"] if a.startswith("--simulate-gpus")]


def test_node_agent_without_egress_holds_no_bpf_privilege(helm: Path) -> None:
    pod = agent_pod(render(helm, {"nodeAgent": {"egress": {"enabled": False}}}))
    container = pod["containers"][0]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert {v["name"] for v in pod["volumes"]} == {"socket", "seccomp", "tmp"}
    assert "--no-egress" in container["args"]


def test_with_mps_the_agent_runs_the_daemons_and_the_operator_mounts_them(helm: Path) -> None:
    objects = render(helm, {"nodeAgent": {"mps": {"enabled": True, "hostDir": "/run/x/mps"}}})
    pod = agent_pod(objects)
    container = pod["containers"][0]
    assert "--mps-dir=/run/x/mps" in container["args"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"  # the MPS binaries
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert (host_paths["mps"], host_paths["mps-shm"]) == ("/run/x/mps", "/run/x/mps/shm")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert (mounts["mps"], mounts["mps-shm"]) == ("/run/x/mps", "/dev/shm")
    operator = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "BERTH_MPS_HOST_DIR", "value": "/run/x/mps"} in operator["env"]
    # Where the nodes run the agent some other way (the local cluster's demo), the operator
    # still mounts the folder their agents were told.
    elsewhere = render(helm, {"nodeAgent": {"enabled": False, "mps": {"enabled": True}}})
    operator = one(elsewhere, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "BERTH_MPS_HOST_DIR", "value": "/run/berth/mps"} in operator["env"]
    # Off by default: nothing of it anywhere.
    default = render(helm)
    assert "mps" not in json.dumps(agent_pod(default))
    plain = one(default, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert all(e["name"] != "BERTH_MPS_HOST_DIR" for e in plain["env"])


def test_node_agent_image_follows_the_runtime_image(helm: Path) -> None:
    objects = render(helm, {"runtimeImage": "berth.local/runtime:abc"})
    agent = one(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
    assert agent["image"] == "berth.local/runtime:abc"


def test_node_agent_off(helm: Path) -> None:
    objects = render(helm, {"nodeAgent": {"enabled": False}})
    assert not [o for o in objects if "node-agent" in o["metadata"]["name"]]


def rules_of(role: Obj) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_namespaced_rbac(helm: Path) -> None:
    cluster_wide = render(helm)
    namespaced = render(helm, {"watchNamespaces": ["team-a", "team-b"]})
    everything = rules_of(one(cluster_wide, "ClusterRole", "berth-operator"))
    cluster_rules = rules_of(one(namespaced, "ClusterRole", "berth-operator"))
    roles = [
        o for o in namespaced if o["kind"] == "Role" and o["metadata"]["name"] == "berth-operator"
    ]
    bindings = [
        o
        for o in namespaced
        if o["kind"] == "RoleBinding" and o["metadata"]["name"] == "berth-operator"
    ]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    namespace_rules = rules_of(roles[0])
    # Nothing lost, nothing added: the cluster-wide rules are split, not changed.
    assert cluster_rules | namespace_rules == everything
    assert not cluster_rules & namespace_rules
    assert not {r for r in cluster_rules if r[0] in ("berth.dev", "networking.k8s.io", "policy")}
    assert ("", "secrets", "create") in namespace_rules
    # The autoscaler: the admin token to park and wake, the routing label on pods.
    assert {("", "secrets", "get"), ("", "pods", "patch")} <= namespace_rules
    assert ("", "pods/binding", "create") in cluster_rules  # the scheduler binds anywhere
    assert ("berth.dev", "inferenceservices/finalizers", "update") in namespace_rules


def test_node_agent_rbac_is_what_it_calls(helm: Path) -> None:
    role = one(render(helm), "ClusterRole", "berth-node-agent")
    assert rules_of(role) == {
        ("", "nodes", "patch"),  # NodePublisher: the GPU annotations on its Node
        ("", "pods", "get"), ("", "pods", "list"), ("", "pods", "watch"),  # PodWatch
        ("", "pods", "patch"),  # the standby annotation on a parked tenant's pod
        ("", "events", "create"),  # record_event
    }  # fmt: skip


BERTH_NAME = re.compile(r"\bberth_[a-z_]+")
SUFFIXES = ("_bucket", "_total", "_count", "_sum")


def exported_names() -> set[str]:
    """Every series name the operator, the node agent and the runtime declare."""
    families = list(OperatorMetrics().registry.collect())  # a labelled family has no samples yet
    names = {f.name + ("_total" if f.type == "counter" else "") for f in families}
    names |= set(agent_metrics.GPU_GAUGES) | set(agent_metrics.TENANT_GAUGES)
    counters = [agent_metrics.RECLAIMS, agent_metrics.RECLAIM_OVERDUE, agent_metrics.OVER_GRANT,
                agent_metrics.LAPSES, agent_metrics.PARK_REQUESTS, agent_metrics.PARKS]  # fmt: skip
    names |= {agent_metrics.TENANT_STATE, agent_metrics.RECOVERING, *counters}
    names |= {f"{c}_total" for c in counters}
    for value in vars(runtime_metrics).values():
        if isinstance(value, runtime_metrics.Name):
            names |= {value.berth, *(value.berth + s for s in SUFFIXES)}
    return names


def dashboard() -> Obj:
    loaded: Obj = json.loads((CHART / "dashboards" / "berth.json").read_text())
    return loaded


def test_dashboard_reads_only_metrics_the_code_exports() -> None:
    board = dashboard()
    queries = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    queries += [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    used = {name for query in queries for name in BERTH_NAME.findall(query)}
    assert len(used) >= 15
    assert used <= exported_names(), used - exported_names()


def test_dashboard_shows_what_the_issue_asks() -> None:
    queries = " ".join(t["expr"] for p in dashboard()["panels"] for t in p.get("targets", []))
    for needed in ["berth_gpu_memory_capacity_bytes", "berth_gpu_memory_requested_bytes",
                   "berth_gpu_memory_granted_bytes", "berth_gpu_tenant_resident_bytes",
                   "berth_requests_running", "berth_time_to_first_token_seconds_bucket",
                   "berth_inter_token_latency_seconds_bucket", "berth_generation_tokens_total",
                   "berth_standby_state", "berth_scheduler_binds_total",
                   "berth_scheduler_bind_failures_total"]:  # fmt: skip
        assert needed in queries, needed
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_config_map_holds_the_file(helm: Path) -> None:
    config_map = one(render(helm, {"dashboard": {"enabled": True}}), "ConfigMap", "berth-dashboard")
    assert json.loads(config_map["data"]["berth.json"]) == dashboard()
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"


GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$gpu": ".*", "$model": ".*"}


@pytest.mark.skipif(
    prometheus.BINARY is None, reason="Debian's prometheus package is not installed"
)
def test_dashboard_queries_parse_on_a_real_prometheus(tmp_path: Path) -> None:
    """Every panel's PromQL, with Grafana's variables filled in, is accepted and evaluated by a
    real Prometheus (a query it cannot parse answers 400, which ``query`` raises)."""
    queries = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    with prometheus.serving({"scrape_configs": []}, tmp_path) as url:
        for query in queries:
            for variable, value in GRAFANA_VARIABLES.items():
                query = query.replace(variable, value)
            assert "$" not in query, query
            assert prometheus.query(url, query) == [], query  # nothing scraped: empty, not an error
