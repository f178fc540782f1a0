"""The operator as a real child process, plus helpers the operator's e2e tests share."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from berth import wire
from berth.cluster.cluster import ClusterError, LocalCluster, die_with_parent, free_port
from berth.cluster.realnode import MPS_DIR
from berth.operator.status import condition as condition  # the e2e modules' one import

ROOT = Path(__file__).resolve().parent.parent


def runtime_image(cluster: LocalCluster) -> str:
    """The image the e2e operator renders: the real node's imported runtime image, if any."""
    return cluster.images.get("runtime", "berth-runtime:e2e")


class OperatorProcess:
    """``python -m berth operator`` against the cluster; killed and restarted by tests."""

    def __init__(
        self, cluster: LocalCluster, log_dir: Path, *args: str, kubeconfig: Path | None = None
    ) -> None:
        self.cluster, self.log_dir, self.args = cluster, log_dir, args
        self.kubeconfig = kubeconfig or cluster.kubeconfig
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.health_port = 0  # its /healthz, /readyz and /metrics, on a free port per start

    def start(self) -> None:
        self.starts += 1
        log = (self.log_dir / f"operator-{self.starts}.log").open("wb")
        self.health_port = free_port()
        env = {
            **self.cluster.env(),
            "KUBECONFIG": str(self.kubeconfig),
            "BERTH_RUNTIME_IMAGE": runtime_image(self.cluster),
            "BERTH_HEALTH_PORT": str(self.health_port),
            "BERTH_MPS_HOST_DIR": str(MPS_DIR),  # the real node's agent runs with --mps-dir
            "PYTHONUNBUFFERED": "1",
        }
        command = [
            sys.executable,
            "-m",
            "berth",
            "operator",
            "--kubeconfig",
            str(self.kubeconfig),
            *self.args,
        ]
        self.process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            preexec_fn=die_with_parent,  # never outlive the test run
        )

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, like a node failure."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        path = self.log_dir / f"operator-{self.starts}.log"
        return (
            "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            if path.exists()
            else ""
        )


def wait_for(what: str, check: Callable[[], Any], timeout: float = 90.0, every: float = 1.0) -> Any:
    """Poll until ``check`` returns something truthy; fail with ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def get_json(cluster: LocalCluster, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json"))


def apply_docs(cluster: LocalCluster, docs: list[dict[str, Any]]) -> str:
    return cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))


def install_crds(cluster: LocalCluster) -> None:
    """Apply crds/ and wait until the API serves InferenceServices (Established comes first;
    lists answer 429 while the storage initialises)."""
    cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    wait_for("the InferenceService API to serve", lambda: _serves(cluster), timeout=60, every=0.5)


def _serves(cluster: LocalCluster) -> bool:
    try:
        cluster.kubectl("get", "inferenceservices", "-A")
        return True
    except ClusterError:
        return False


def service_manifest(
    name: str, namespace: str, fraction: float, replicas: int = 1, **spec: Any
) -> dict[str, Any]:
    return {
        "apiVersion": f"{wire.GROUP}/{wire.VERSION}",
        "kind": "InferenceService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"source": {"hostPath": {"path": f"/models/{name}"}}},
            "gpu": {"fraction": fraction},
            "replicas": replicas,
            "maxReplicas": max(replicas, 1),
            **spec,
        },
    }


def berth_pods(cluster: LocalCluster, namespace: str) -> list[dict[str, Any]]:
    pods = get_json(cluster, "pods", "-n", namespace, "-l", wire.LABEL_SERVICE)["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def gpu_usage(cluster: LocalCluster) -> dict[tuple[str, int], list[tuple[str, int]]]:
    """(node, gpu index) -> [(pod, request bytes)] over every bound berth pod in the cluster."""
    pods = get_json(
        cluster, "pods", "-A", "--field-selector", f"spec.schedulerName={wire.SCHEDULER_NAME}"
    )
    usage: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for pod in pods["items"]:
        node = pod["spec"].get("nodeName")
        annotations = pod["metadata"].get("annotations") or {}
        if not node or pod["status"].get("phase") in ("Succeeded", "Failed"):
            continue
        key = (node, int(annotations[wire.POD_GPU_INDEX]))
        usage.setdefault(key, []).append(
            (pod["metadata"]["name"], int(annotations[wire.POD_GPU_MEMORY_REQUEST]))
        )
    return usage


def gpu_capacity(cluster: LocalCluster) -> dict[str, int]:
    """Node -> bytes per GPU, from the GPU memory label."""
    nodes = get_json(cluster, "nodes")["items"]
    return {
        n["metadata"]["name"]: int(n["metadata"]["labels"][wire.NODE_GPU_MEMORY_MIB]) * 2**20
        for n in nodes
        if wire.NODE_GPU_MEMORY_MIB in n["metadata"].get("labels", {})
    }


CHART = ROOT / "charts" / "berth"
CHART_NAMESPACE = "berth-system"


def install_chart(cluster: LocalCluster, state: Path) -> Path:
    """``helm install`` the chart and return a kubeconfig for its ServiceAccount, so that the
    operator process runs with exactly the chart's RBAC (its Deployment's pod is only a kwok
    stand-in)."""
    cluster.helm("upgrade", "--install", "berth", str(CHART), "--namespace", CHART_NAMESPACE,
                 "--create-namespace", "--skip-crds", "--wait=false")  # fmt: skip
    token = cluster.kubectl("create", "token", "berth-operator", "-n", CHART_NAMESPACE).strip()
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    for user in config["users"]:
        user["user"] = {"token": token}
    for context in config["contexts"]:  # the operator's Lease lives in the chart's namespace
        context["context"]["namespace"] = CHART_NAMESPACE
    path = state / "operator.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def operator(
    cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """CRDs and the chart installed, one operator process running as the chart's
    ServiceAccount; stopped when the module ends."""
    install_crds(cluster)
    state = tmp_path_factory.mktemp("operator")
    process = OperatorProcess(cluster, state, kubeconfig=install_chart(cluster, state))
    process.start()
    try:
        yield process
    finally:
        process.stop()
        print(process.log_tail(), file=sys.stderr)


@pytest.fixture
def namespace(cluster: LocalCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"e2e-{request.node.name.replace('_', '-')[5:40].strip('-')}-{os.getpid() % 1000}"
    cluster.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
