"""What the real-node tests share: the models the pods serve (hostPath folders, as fixtures that
conftest.py offers every module), the manifest of a service that lands on the real node, and
requests through a Service's ClusterIP."""

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from berth import wire
from berth.cluster.cluster import LocalCluster
from berth.cluster.realnode import NODE_NAME, TAINT_KEY, RealNodeShape
from berth.e2e.operator_fixtures import berth_pods, condition, get_json, wait_for

MODELS = Path("/var/tmp/berth-e2e-models")  # readable by the pods' non-root user
PRODUCT = RealNodeShape().gpu_product


@pytest.fixture
def needs_real_node(cluster: LocalCluster) -> None:
    if not cluster.real_node:
        pytest.skip("this run's cluster has no real node (see the session's first line)")


@pytest.fixture(scope="module")
def tiny_model() -> Iterator[Path]:
    """The random-weight tiny model the runtime serves, on a hostPath the pods can read."""
    target = MODELS / "tiny"
    if not (target / "config.json").exists():
        MODELS.mkdir(parents=True, exist_ok=True)
        MODELS.chmod(0o755)
        subprocess.run([sys.executable, "-m", "berth", "make-model", "tiny", "--out", str(target)],
                       check=True, capture_output=True)  # fmt: skip
        for path in [target, *target.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    yield target


@pytest.fixture(scope="module")
def smollm2_model() -> Path:
    """The real SmolLM2-135M-Instruct (imported from its wheel, cached) on a hostPath."""
    from berth.runtime.engine.gguf_import import import_model

    target = MODELS / "smollm2"
    if not (target / "config.json").exists():
        MODELS.mkdir(parents=True, exist_ok=True)
        MODELS.chmod(0o755)
        shutil.copytree(import_model("smollm2", say=lambda _: None), target, dirs_exist_ok=True)
        for path in [target, *target.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def real_service(name: str, namespace: str, model: Path, fraction: float = 0.5,
                 **spec: Any) -> dict[str, Any]:  # fmt: skip
    return {
        "apiVersion": f"{wire.GROUP}/{wire.VERSION}",
        "kind": "InferenceService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"source": {"hostPath": {"path": str(model)}}, "servedName": name},
            "gpu": {"fraction": fraction, "product": PRODUCT},
            "runtime": {"dtype": "float32", "maxNumSeqs": 8, "maxModelLen": 256},
            "replicas": 1,
            "pod": {
                "tolerations": [{"key": TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}]
            },
            **spec,
        },
    }


def cluster_ip(cluster: LocalCluster, name: str, namespace: str) -> str:
    ip: str = get_json(cluster, "service", name, "-n", namespace)["spec"]["clusterIP"]
    return ip


def routed_post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    """``post`` once the Service routes: a pod turns Ready a moment before kube-proxy has its
    endpoints (the ClusterIP refuses until then). Twice in CI the first answers were 404s right
    after both pods turned Ready (once a model_not_found from another model's server, once a 404
    of another kind): most likely a ClusterIP recycled from an earlier test's Service whose
    kube-proxy rule, not yet synced, led to an address the network had since given to another
    pod. Refusals and 404s count as not routed yet; a right answer within 60 s is still
    required, and a timeout names the 404s seen."""
    not_found: list[str] = []

    def attempt() -> dict[str, Any] | None:
        try:
            return post(url, body)
        except urllib.error.HTTPError as error:
            if error.code == 404:
                not_found.append(error.read().decode(errors="replace")[:300])
                return None
            raise
        except urllib.error.URLError as error:
            if isinstance(error.reason, ConnectionRefusedError):
                return None
            raise

    what = f"{url} to route (refused, or a 404 from another server, until then)"
    try:
        answer: dict[str, Any] = wait_for(what, attempt, timeout=60, every=0.5)
    except pytest.fail.Exception:
        pytest.fail(f"{what}: no answer in 60 s; 404 bodies seen: {not_found[-3:]!r}")
    return answer


def post(url: str, body: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def ready_pod(cluster: LocalCluster, namespace: str) -> dict[str, Any] | None:
    for pod in berth_pods(cluster, namespace):
        if condition(pod, "Ready").get("status") == "True":
            return pod
    return None


def tenants(cluster: LocalCluster) -> list[str]:
    """Berth pods bound to the real node, in any namespace (an earlier test's may linger)."""
    pods = get_json(cluster, "pods", "-A", "--field-selector", f"spec.nodeName={NODE_NAME}")
    return [
        p["metadata"]["name"]
        for p in pods["items"]
        if wire.LABEL_SERVICE in p["metadata"].get("labels", {})
    ]
