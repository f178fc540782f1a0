"""The local control plane is the real thing: real binaries, real scheduler, real GC, kwok nodes."""

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from berth.cluster.cluster import COMPONENTS, ClusterError, LocalCluster, port_in_use, process_alive
from berth.cluster.realnode import NODE_NAME
from berth.operator.inventory import Inventory

pytestmark = pytest.mark.e2e
T = TypeVar("T")

GPU_DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: gpu-smoke, namespace: smoke}
spec:
  replicas: 3
  selector: {matchLabels: {app: gpu-smoke}}
  template:
    metadata: {labels: {app: gpu-smoke}}
    spec:
      containers:
      - name: main
        image: registry.invalid/none:1
        resources:
          limits: {nvidia.com/gpu: 1}
"""


def wait_for(predicate: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def pods(cluster: LocalCluster, namespace: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(
        cluster.kubectl("get", "pods", "-n", namespace, "-o", "json")
    )["items"]
    return items


def test_api_server_is_the_pinned_real_release(cluster: LocalCluster) -> None:
    version = json.loads(cluster.kubectl("version", "-o", "json"))
    assert version["serverVersion"]["gitVersion"] == "v1.34.4"
    assert version["clientVersion"]["gitVersion"] == "v1.34.4"


def test_kwok_gpu_nodes_are_ready_with_gpu_capacity_and_labels(cluster: LocalCluster) -> None:
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json"))["items"]
    ready = {
        n["metadata"]["name"]
        for n in nodes
        if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"])
    }
    kwok = {"gpu-node-0", "gpu-node-1", "gpu-node-2", "gpu-node-3", "cpu-node"}
    assert ready == (kwok | {NODE_NAME} if cluster.real_node else kwok)
    gpu_nodes = [
        n
        for n in nodes
        if "nvidia.com/gpu" in n["status"]["capacity"] and n["metadata"]["name"] in kwok
    ]
    assert len(gpu_nodes) == 4
    for node in gpu_nodes:
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        assert node["metadata"]["labels"]["nvidia.com/gpu.memory"] == "81559"
        assert len(node["metadata"]["annotations"]["berth.dev/gpu-uuids"].split(",")) == 8
    table = cluster.kubectl(
        "get", "nodes", "-o", "custom-columns=N:.metadata.name,G:.status.capacity.nvidia\\.com/gpu"
    )
    assert "gpu-node-0   8" in table


def test_scheduler_binds_gpu_pods_and_gc_removes_them(cluster: LocalCluster) -> None:
    cluster.kubectl("create", "namespace", "smoke")
    cluster.kubectl("apply", "-f", "-", input=GPU_DEPLOYMENT)

    def all_running() -> list[dict[str, Any]] | None:
        current = pods(cluster, "smoke")
        running = [p for p in current if p["status"].get("phase") == "Running"]
        return running if len(running) == 3 else None

    running = wait_for(all_running, 60, "3 GPU pods Running")
    for pod in running:  # bound by the real kube-scheduler, onto GPU nodes only
        assert pod["spec"]["nodeName"].startswith("gpu-node-")
        scheduled = [c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled"]
        assert scheduled and scheduled[0]["status"] == "True"
    events = cluster.kubectl("get", "events", "-n", "smoke", "--field-selector", "reason=Scheduled")
    assert "default-scheduler" in events or "Successfully assigned" in events

    cluster.kubectl("delete", "deployment", "gpu-smoke", "-n", "smoke", "--wait=false")
    wait_for(lambda: not pods(cluster, "smoke"), 60, "the garbage collector to remove the pods")
    assert not cluster.kubectl("get", "replicasets", "-n", "smoke", "-o", "name").strip()


def test_cli_up_status_down_leaves_no_process_or_port(tmp_path: Path) -> None:
    inventory = tmp_path / "nodes.yaml"
    inventory.write_text(
        yaml.safe_dump(
            {
                "nodes": [
                    {
                        "name": "a100",
                        "gpus": 4,
                        "gpuProduct": "NVIDIA-A100-SXM4-40GB",
                        "gpuMemoryMiB": 40960,
                    }
                ]
            }
        )
    )
    state = tmp_path / "state"
    berth = [sys.executable, "-m", "berth"]
    started = time.monotonic()
    up = subprocess.run(
        [*berth, "cluster", "up", "--state-dir", str(state), "--nodes", str(inventory), "--port", "0",
         "--no-real-node"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert up.returncode == 0, up.stderr
    assert elapsed < 60, f"cluster up took {elapsed:.1f} s"
    assert "a100" in up.stdout and "NVIDIA-A100-SXM4-40GB" in up.stdout
    saved = json.loads((state / "state.json").read_text())
    status = subprocess.run([*berth, "cluster", "status", "--state-dir", str(state)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert status.stdout.count("running (pid") == len(COMPONENTS)

    down = subprocess.run([*berth, "cluster", "down", "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert down.returncode == 0, down.stderr
    for pid in saved["pids"].values():
        assert not process_alive(pid), f"pid {pid} outlived `berth cluster down`"
    for port in saved["ports"].values():
        assert not port_in_use(port), f"port {port} still listening after down"


def test_port_already_taken_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        other = LocalCluster(
            state_dir=tmp_path,
            api_port=taken,
            inventory=Inventory.model_validate({"nodes": [{"name": "x"}]}),
        )
        with pytest.raises(ClusterError, match=f"port {taken} on 127.0.0.1 is already in use"):
            other.up()


def test_pod_ready_delay_holds_a_bound_pod_until_it_has_loaded(tmp_path: Path) -> None:
    delay = 4.0
    inventory = Inventory.model_validate({"nodes": [{"name": "cpu"}]})
    with LocalCluster(state_dir=tmp_path, inventory=inventory, pod_ready_delay_s=delay) as slow:
        slow.kubectl("run", "model", "--image=registry.invalid/none:1", "--restart=Never")

        def bound() -> dict[str, Any] | None:
            pod = json.loads(slow.kubectl("get", "pod", "model", "-o", "json"))
            return pod if pod["spec"].get("nodeName") else None

        pod = wait_for(bound, 30, "the pod to be bound")
        bound_at = time.monotonic()
        assert pod["status"].get("phase") == "Pending" and not pod["status"].get("podIP")

        def ready() -> dict[str, Any] | None:
            pod = json.loads(slow.kubectl("get", "pod", "model", "-o", "json"))
            conditions = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
            return pod if conditions.get("Ready") == "True" else None

        pod = wait_for(ready, 30, "the pod to turn Ready")
        assert time.monotonic() - bound_at >= delay - 1.0  # bound is observed up to 0.5 s late
        assert pod["status"]["phase"] == "Running" and pod["status"]["podIP"]
        assert pod["status"]["containerStatuses"][0]["ready"] is True

        slow.kubectl("delete", "pod", "model", "--wait=false")
        wait_for(lambda: not pods(slow, "default"), 30, "the deleted pod to go away")
