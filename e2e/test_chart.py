"""The Helm chart against the real API server.

Every object the chart renders, with default and with non-default values, passes the API server's
own validation (server-side dry run: the pinned release's schemas, admission, RBAC rules that name
real verbs), and every example passes the CRD's schema and CEL rules. With the real node, the
chart installs for real: the operator runs as the chart's two pods and the node agent as its
DaemonSet's pod (in place of the real node's host-process agent, with the eBPF egress enforcer
loaded from the runtime image), ``helm test`` passes, the examples reach their expected states
(the runtime pods register with the chart's agent), ``helm upgrade`` rolls the operator without
double-booking a GPU and ``helm uninstall`` leaves nothing but the CRD.
"""

import contextlib
import json
import re
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml

from berth import wire
from berth.cluster.cluster import LocalCluster
from berth.cluster.demo import real_node_values
from berth.cluster.pki import NODE_IP
from berth.cluster.realnode import AGENT_DIR, AGENT_SOCKET, NODE_NAME, REAL_NODE_POD
from berth.e2e.agent_process import metric
from berth.e2e.operator_fixtures import (
    CHART,
    CHART_NAMESPACE,
    ROOT,
    apply_docs,
    berth_pods,
    condition,
    get_json,
    gpu_usage,
    install_crds,
    wait_for,
)
from berth.e2e.real_node import ready_pod, tenants
from berth.e2e.sandbox_fixtures import CONNECT, PYTHON, sealed_service

Obj = dict[str, Any]
NON_DEFAULT = CHART / "ci" / "non-default-values.yaml"
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.yaml") if p.name != "inventory.yaml")
# Kinds whose CRDs this cluster lacks (prometheus-operator's): rendered, not sent.
NOT_SERVED = {"ServiceMonitor", "PodMonitor"}
RELEASE = "berth"


def rendered(cluster: LocalCluster, *values: str) -> list[Obj]:
    flags = [arg for path in values for arg in ("--values", path)]
    out = cluster.helm("template", RELEASE, str(CHART), "--namespace", CHART_NAMESPACE, *flags)
    return [doc for doc in yaml.safe_load_all(out) if doc]


def pod_of(workload: Obj) -> Obj:
    """A workload's pod template as a Pod of its own: pod-level admission (priority classes,
    security context) checks pods, not their templates."""
    template = workload["spec"]["template"]
    metadata = {**template["metadata"], "name": f"{workload['metadata']['name']}-template",
                "namespace": workload["metadata"]["namespace"]}  # fmt: skip
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}


@pytest.fixture(scope="module")
def namespaces(cluster: LocalCluster) -> Iterator[None]:
    """The namespaces the non-default values name, CRDs for the examples, and the RuntimeClass
    that NVIDIA's GPU operator makes on a GPU cluster (the node agent's pods name it; the API
    server refuses a pod whose RuntimeClass does not exist)."""
    install_crds(cluster)
    names = ["team-a", "team-b", "monitoring", CHART_NAMESPACE]
    made = [n for n in names if cluster.kubectl("create", "namespace", n, check=False) != ""]
    nvidia = {"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
              "metadata": {"name": "nvidia"}, "handler": "nvidia"}  # fmt: skip
    made_class = cluster.kubectl("create", "-f", "-", input=json.dumps(nvidia), check=False) != ""
    try:
        yield
    finally:
        if made_class:
            cluster.kubectl("delete", "runtimeclass", "nvidia", check=False)
        for name in made:
            if name != CHART_NAMESPACE:  # other modules' operator fixture installs there
                cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.mark.parametrize("values", [[], [str(NON_DEFAULT)]], ids=["default", "non-default"])
def test_every_rendered_object_passes_the_api_server(
    cluster: LocalCluster, namespaces: None, values: list[str]
) -> None:
    objects = rendered(cluster, *values)
    if values:
        # The chart's objects have fixed names, and the release that other modules install
        # here holds them: under names of their own, the dry run checks a create of each.
        for obj in objects:
            obj["metadata"]["name"] += "-non-default"
    sent = [o for o in objects if o["kind"] not in NOT_SERVED | {"Pod"}]
    # Pods (helm test's, the workloads' templates) under the namespace's default ServiceAccount:
    # a dry run creates none of the chart's, and the ServiceAccount admission plugin looks it up.
    pods = [o for o in objects if o["kind"] == "Pod"]
    pods += [pod_of(o) for o in objects if o["kind"] in ("Deployment", "DaemonSet")]
    sent += [{**p, "spec": {**p["spec"], "serviceAccountName": "default"}} for p in pods]
    out = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(sent))
    assert out.count("(server dry run)") == len(sent), out
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "DaemonSet", "Service", "ClusterRole", "Pod"} <= kinds
    if values:
        assert {"ServiceMonitor", "PodMonitor", "ConfigMap", "Role"} <= kinds


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_passes_admission(cluster: LocalCluster, namespaces: None, example: Path) -> None:
    docs = [d for d in yaml.safe_load_all(example.read_text()) if d]
    out = cluster.kubectl("apply", "--dry-run=server", "-n", "team-a", "-f", str(example))
    assert out.count("created (server dry run)") == len(docs), out


# With the real node: the chart for real.


def json_stream(text: str) -> Iterator[Obj]:
    """The objects of ``kubectl get --watch -o json``: JSON documents one after another."""
    decoder, at = json.JSONDecoder(), 0
    while (at := len(text) - len(text[at:].lstrip())) < len(text):
        obj, at = decoder.raw_decode(text, at)
        yield obj


def helm_install(cluster: LocalCluster, *extra: str) -> None:
    assert cluster.node is not None
    # The node agent as the chart's DaemonSet on the real node (null drops the chart's default
    # GPU-node selector): its simulated GPUs are the ones the Node advertises, its seccomp folder
    # the kubelet's.
    agent_selector = {**REAL_NODE_POD["nodeSelector"], "nvidia.com/gpu.present": None}
    cluster.helm("upgrade", "--install", RELEASE, str(CHART), "--namespace", CHART_NAMESPACE,
                 "--create-namespace", "--wait", "--timeout", "240s", *real_node_values(cluster),
                 "--set-json", f"nodeAgent.nodeSelector={json.dumps(agent_selector)}",
                 "--set-json", f"nodeAgent.tolerations={json.dumps(REAL_NODE_POD['tolerations'])}",
                 "--set", "nodeAgent.runtimeClassName=",
                 "--set", f"nodeAgent.socketDir={AGENT_DIR}",
                 "--set", f"nodeAgent.kubeletSeccompDir={cluster.node.kubelet_root / 'seccomp'}",
                 # --set would split the GPU list at its commas.
                 "--set-json", f"nodeAgent.simulateGpus={json.dumps(cluster.node.simulated_gpus())}",
                 *extra, timeout=300)  # fmt: skip


def operator_pods(cluster: LocalCluster) -> list[Obj]:
    selector = "app.kubernetes.io/name=berth-operator"
    pods: list[Obj] = get_json(cluster, "pods", "-n", CHART_NAMESPACE, "-l", selector)["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def example_docs(name: str, models: dict[str, Path]) -> list[Obj]:
    """An example's documents, with the demo's hostPaths pointed at this run's model folders."""
    docs = [d for d in yaml.safe_load_all((ROOT / "examples" / name).read_text()) if d]
    for doc in docs:
        host = doc["spec"]["model"]["source"].get("hostPath")
        if host and Path(host["path"]).name in models:
            host["path"] = str(models[Path(host["path"]).name])
    return docs


def double_booked(cluster: LocalCluster) -> list[str]:
    """GPUs whose bound tenants' requests add up to more than the GPU holds."""
    nodes = {n["metadata"]["name"]: n for n in get_json(cluster, "nodes")["items"]}
    over = []
    for (node, index), booked in gpu_usage(cluster).items():
        labels = nodes[node]["metadata"]["labels"]
        capacity = int(labels.get(wire.NODE_GPU_MEMORY_MIB, "0")) * 2**20
        if capacity and sum(request for _, request in booked) > capacity:
            over.append(f"{node}/{index}: {booked}")
    return over


@pytest.fixture(scope="module")
def chart_release(cluster: LocalCluster, namespaces: None) -> Iterator[None]:
    if not cluster.real_node:
        pytest.skip("this run's cluster has no real node (see the session's first line)")
    with cluster.node_agent_handed_over():
        helm_install(cluster)
        try:
            # helm's --wait lets a DaemonSet be one pod short (its maxUnavailable): not here.
            out = cluster.kubectl("rollout", "status", "daemonset/berth-node-agent", "-n",
                                  CHART_NAMESPACE, "--timeout=120s", check=False)  # fmt: skip
            assert "successfully rolled out" in out, out + cluster.kubectl(
                "logs", "-n", CHART_NAMESPACE, "daemonset/berth-node-agent", check=False
            )
            yield
        finally:
            cluster.helm("uninstall", RELEASE, "--namespace", CHART_NAMESPACE, "--wait",
                         "--timeout", "240s", check=False, timeout=300)  # fmt: skip


def test_installed_operator_runs_as_the_charts_pod_and_helm_test_passes(
    cluster: LocalCluster, chart_release: None
) -> None:
    pods = operator_pods(cluster)
    assert len(pods) == 2
    assert {p["spec"]["nodeName"] for p in pods} == {NODE_NAME}
    lease = get_json(cluster, "lease", "berth-operator", "-n", CHART_NAMESPACE)
    holder = lease["spec"].get("holderIdentity", "")
    assert any(holder.startswith(p["metadata"]["name"]) for p in pods), holder
    # helm test deletes its pod when it passes (so nothing is left behind), logs and all: what
    # its tiny-model InferenceService went through is watched from here while it runs.
    assert cluster.bin_dir is not None
    watch = subprocess.Popen(
        [str(cluster.bin_dir / "kubectl"), "--kubeconfig", str(cluster.kubeconfig), "get",
         "inferenceservices", "-n", CHART_NAMESPACE, "--watch", "-o", "json"],
        stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        out = cluster.helm("test", RELEASE, "--namespace", CHART_NAMESPACE, "--timeout", "360s",
                           check=False, timeout=420)  # fmt: skip
        time.sleep(2)  # the last updates
    finally:
        watch.terminate()
    stream, _ = watch.communicate(timeout=10)
    seen = {condition(obj, "Ready").get("status", "absent") for obj in json_stream(stream)
            if obj["metadata"]["name"] == "berth-operator-smoke-test"}  # fmt: skip
    assert re.search(r"Phase:\s+Succeeded", out), out
    assert "True" in seen, seen  # the random tiny model was served (and answered, or it fails)
    # ... and deleted by the test afterwards.
    assert not cluster.kubectl("get", "inferenceservices", "-n", CHART_NAMESPACE, "-o", "name")


def test_node_agent_runs_as_the_charts_daemonset_with_its_enforcer(
    cluster: LocalCluster, chart_release: None
) -> None:
    from berth.runtime.server.agent_client import AgentClient

    pods = agent_pods(cluster)
    assert [p["spec"]["nodeName"] for p in pods] == [NODE_NAME]
    assert pods[0]["status"]["phase"] == "Running"
    # The node's socket is the pod's: its ledger holds the GPUs the Node advertises.
    ledger = AgentClient(str(AGENT_SOCKET), timeout_s=5.0).ledger()
    node = get_json(cluster, "node", NODE_NAME)
    advertised = node["metadata"]["annotations"][wire.NODE_GPU_UUIDS].split(",")
    assert sorted(g.uuid for g in ledger.gpus) == sorted(advertised)
    # Its metrics on the pod's address, as the PodMonitor scrapes them; the egress enforcer's
    # family is there only when libbpf and the eBPF object loaded in the image.
    url = agent_metrics_url(pods[0])
    text = wait_for("the agent's metrics port", lambda: _get(url))
    assert "berth_gpu_memory_capacity_bytes{" in text
    assert "# TYPE berth_egress_denials_total counter" in text, text[-2000:]


def test_the_charts_operator_and_agent_seal_a_sandboxed_service(
    cluster: LocalCluster,
    chart_release: None,
    namespace: str,
    tiny_model: Path,
    node_listeners: tuple[int, int],
) -> None:
    """The sandbox end to end with nothing but what Helm installed: the chart's operator renders
    it, the chart's agent installs its seccomp profile and attaches the enforcer from the image."""
    allowed, other = node_listeners
    wait_for("earlier pods to leave the real node", lambda: not tenants(cluster), timeout=120)
    apply_docs(cluster, [sealed_service("sealed", namespace, tiny_model, port=allowed)])
    pod = wait_for("the sandboxed pod Ready", lambda: ready_pod(cluster, namespace), timeout=240)
    name = pod["metadata"]["name"]
    status = cluster.kubectl("exec", "-n", namespace, name, "--", "cat", "/proc/1/status")
    assert re.search(r"^Seccomp:\s+2$", status, re.M), status  # its Localhost profile, filtering
    pairs = json.dumps([[NODE_IP, allowed], [NODE_IP, other]])

    def enforced() -> list[str] | None:
        met = cluster.kubectl("exec", "-n", namespace, name, "--", PYTHON, "-c", CONNECT,
                              pairs).split()  # fmt: skip
        return met if met[1] != "ok" else None

    assert wait_for("the enforcer on the pod", enforced, timeout=30) == ["ok", "EPERM"]
    (agent,) = agent_pods(cluster)
    url = agent_metrics_url(agent)

    def denials() -> float | None:
        return metric(_get(url), "berth_egress_denials_total", pod=f"{namespace}/{name}")

    assert wait_for("the denial counted on the agent's metrics", denials, timeout=30) >= 1
    cluster.kubectl("delete", "inferenceservice", "sealed", "-n", namespace, "--wait=true")
    wait_for("the sandboxed pod to leave the node", lambda: not tenants(cluster), timeout=120)


def agent_pods(cluster: LocalCluster) -> list[Obj]:
    selector = "app.kubernetes.io/name=berth-node-agent"
    pods: list[Obj] = get_json(cluster, "pods", "-n", CHART_NAMESPACE, "-l", selector)["items"]
    return pods


def agent_metrics_url(pod: Obj) -> str:
    """The agent pod's /metrics at the chart's default nodeAgent.metricsPort."""
    return f"http://{pod['status']['podIP']}:9401/metrics"


def _get(url: str) -> str:
    import httpx

    try:
        return httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return ""


def test_examples_reach_their_states(
    cluster: LocalCluster,
    chart_release: None,
    namespace: str,
    tiny_model: Path,
    smollm2_model: Path,
) -> None:
    models = {"tiny": tiny_model, "smollm2": smollm2_model}

    def apply(name: str) -> None:
        docs = example_docs(name, models)
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs))

    def service(name: str) -> Obj:
        found: Obj = get_json(cluster, "inferenceservice", name, "-n", namespace)
        return found

    def placed(name: str) -> list[tuple[str, str]]:
        pods = [p for p in berth_pods(cluster, namespace)
                if p["metadata"]["labels"].get(wire.LABEL_SERVICE) == name]  # fmt: skip
        return [(p["spec"].get("nodeName", ""), p["metadata"].get("annotations", {})
                 .get(wire.POD_GPU_INDEX, "")) for p in pods]  # fmt: skip

    def ready(name: str) -> bool:
        return condition(service(name), "Ready").get("status") == "True"

    def all_placed(name: str) -> bool:
        found = placed(name)
        return bool(found) and all(node and index for node, index in found)

    # Three models on one GPU (0.4 + 0.3 + 0.3), applied first so that no other example takes
    # part of a GPU they could share: one node, one GPU index.
    apply("colocated-three.yaml")
    names = ["llama-3-8b-chat", "qwen-7b-coder", "mistral-7b"]
    wait_for("the three co-located models placed", lambda: all(all_placed(n) for n in names))
    assert len({placed(n)[0] for n in names}) == 1, {n: placed(n) for n in names}
    # The rest; smollm2-from-hub downloads from the Hub, which the cluster cannot reach (and
    # cpu-demo has a service of the same name).
    for path in EXAMPLES:
        if path.name not in ("colocated-three.yaml", "smollm2-from-hub.yaml"):
            apply(path.name)
    # The CPU models on the real node serve: Ready.
    for name in ("smollm2", "tiny"):
        wait_for(f"{name} Ready", partial(ready, name), timeout=300)
    # ... each holding its share under the chart's node agent (tenant: namespace/pod).
    from berth.runtime.server.agent_client import AgentClient

    def registered() -> set[str]:
        ledger = AgentClient(str(AGENT_SOCKET), timeout_s=5.0).ledger()
        return {t.tenant for gpu in ledger.gpus for t in gpu.tenants}

    on_node = {f"{namespace}/{p['metadata']['name']}" for p in berth_pods(cluster, namespace)
               if p["spec"].get("nodeName") == NODE_NAME}  # fmt: skip
    assert len(on_node) == 2, on_node
    wait_for("the CPU models registered with the chart's agent", lambda: on_node <= registered())
    # Fractions and request/limit shares are placed on the kwok GPU nodes.
    for name in ("llama-3-8b", "qwen-0-5b", "legal-summarizer", "agent-coder", "llama-3-70b"):
        wait_for(f"{name} placed", partial(all_placed, name))
    # The sandboxed agent's NetworkPolicy.
    wait_for("agent-coder's NetworkPolicy",
             lambda: get_json(cluster, "networkpolicy", "-n", namespace)["items"])  # fmt: skip
    assert not double_booked(cluster)


def test_upgrade_rolls_the_operator_without_double_booking(
    cluster: LocalCluster, chart_release: None
) -> None:
    before = {p["metadata"]["uid"] for p in operator_pods(cluster)}
    helm_install(cluster, "--set", "gpuReserveMiB=512", "--set", "podAnnotations.rolled=yes")

    def rolled() -> list[Obj]:  # two pods, none of the old ones (they may still terminate)
        pods = operator_pods(cluster)
        new = [p for p in pods if p["metadata"]["uid"] not in before]
        return new if len(pods) == len(new) == 2 else []

    pods = wait_for("the operator rolled", rolled, timeout=120)
    env = {e["name"]: e.get("value") for e in pods[0]["spec"]["containers"][0]["env"]}
    assert env["BERTH_GPU_RESERVE_MIB"] == "512"
    # The runtime pods it renders mount the folder the chart's node agents serve on.
    assert env["BERTH_AGENT_SOCKET_DIR"] == str(AGENT_DIR)
    deadline = time.monotonic() + 30  # the new leader rebuilds its ledger from the annotations
    while time.monotonic() < deadline:
        assert not double_booked(cluster)
        time.sleep(2)


def test_uninstall_leaves_only_the_crd(cluster: LocalCluster, chart_release: None) -> None:
    cluster.helm("uninstall", RELEASE, "--namespace", CHART_NAMESPACE, "--wait",
                 "--timeout", "240s", timeout=300)  # fmt: skip
    selector = f"app.kubernetes.io/instance={RELEASE}"

    left: list[str] = []

    def all_gone() -> bool:  # pods leave after their grace period, the rest at once
        left[:] = cluster.kubectl(
            "get", "all,serviceaccounts,roles,rolebindings,configmaps,clusterroles,"
            "clusterrolebindings", "-A", "-l", selector, "-o", "name").split()  # fmt: skip
        return not left

    # 180 s: a pod's 30-s grace behind a busy kubelet (120 s once ran out on the 2-core machine);
    # on a time-out the assertion below names what was left.
    with contextlib.suppress(pytest.fail.Exception):
        wait_for("nothing of the release left", all_gone, timeout=180)
    assert not left, f"left of the release after uninstalling it: {left}"
    assert get_json(cluster, "crd", "inferenceservices.berth.dev")["metadata"]["name"]
