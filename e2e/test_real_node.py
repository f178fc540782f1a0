"""The product's central path on real parts: ``kubectl apply`` an InferenceService, the operator
renders it, Berth's scheduler binds it to the real kubelet node, containerd runs Berth's runtime
image, and a completion through the Service's ClusterIP (kube-proxy) succeeds.

The session cluster (conftest.py) has the real node; its simulated GPUs are tainted, so only the
services here (which tolerate the taint and ask for its GPU product) land on it.
"""

import functools
import http.server
import json
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from berth import wire
from berth.cluster.cluster import LocalCluster
from berth.cluster.pki import NODE_IP
from berth.cluster.realnode import AGENT_SOCKET, NODE_NAME, TAINT_KEY, RealNodeShape
from berth.e2e.operator_fixtures import (
    OperatorProcess,
    apply_docs,
    berth_pods,
    condition,
    get_json,
    wait_for,
)
from berth.e2e.real_node import (
    PRODUCT,
    cluster_ip,
    post,
    ready_pod,
    real_service,
    routed_post,
    tenants,
)
from berth.runtime.server.agent_client import AgentClient

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("needs_real_node")]


def test_real_node_is_ready_with_simulated_gpus_and_a_taint(cluster: LocalCluster) -> None:
    node = get_json(cluster, "node", NODE_NAME)
    assert condition(node, "Ready")["status"] == "True"
    assert node["status"]["capacity"][wire.GPU_RESOURCE] == str(RealNodeShape().gpus)
    assert node["metadata"]["labels"][wire.NODE_GPU_PRODUCT] == PRODUCT
    assert any(t["key"] == TAINT_KEY for t in node["spec"]["taints"])
    assert (
        node["metadata"]["annotations"][wire.NODE_GPU_UUIDS].count("GPU-") == RealNodeShape().gpus
    )


def test_an_applied_service_runs_the_runtime_image_and_answers_through_its_cluster_ip(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str, smollm2_model: Path
) -> None:
    """The real model: SmolLM2 answers a chat question through its Service."""
    service = real_service("smollm2", namespace, smollm2_model)
    service["spec"]["runtime"]["maxModelLen"] = 512
    apply_docs(cluster, [service])
    pod = wait_for(
        "the runtime pod to turn Ready", lambda: ready_pod(cluster, namespace), timeout=240
    )
    assert pod["spec"]["nodeName"] == NODE_NAME
    (status,) = pod["status"]["containerStatuses"]
    assert status["image"].startswith(cluster.images["runtime"].split(":")[0])
    ip = cluster_ip(cluster, "smollm2", namespace)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    answer = routed_post(f"http://{ip}:8000/v1/chat/completions",
                  {"model": "smollm2", "messages": question, "max_tokens": 16, "temperature": 0})  # fmt: skip
    assert "Paris" in answer["choices"][0]["message"]["content"], answer
    # The service's status publishes the URL once a replica is Ready.
    status = wait_for("status.url", lambda: get_json(cluster, "bis", "smollm2", "-n", namespace)
                      .get("status", {}).get("url"))  # fmt: skip
    assert status.endswith(":8000/v1")
    # kubectl logs and exec reach the kubelet through the API server.
    name = pod["metadata"]["name"]
    logs = cluster.kubectl("logs", "-n", namespace, name)
    assert "Uvicorn running" in logs or "Application startup complete" in logs, logs[-2000:]
    assert cluster.kubectl("exec", "-n", namespace, name, "--", "id", "-u").strip() == "65532"


def test_two_half_gpu_services_share_one_simulated_gpu_and_both_serve(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str, tiny_model: Path
) -> None:
    wait_for(
        "earlier tests' pods to leave the real node", lambda: not tenants(cluster), timeout=120
    )
    right = real_service("right", namespace, tiny_model)
    right["spec"]["runtime"]["kvCacheDtype"] = "fp8"  # and left keeps the model's fp32
    apply_docs(cluster, [real_service("left", namespace, tiny_model), right])

    def both_ready() -> list[dict[str, Any]] | None:
        pods = [
            p
            for p in berth_pods(cluster, namespace)
            if condition(p, "Ready").get("status") == "True"
        ]
        return pods if len(pods) == 2 else None

    pods = wait_for("both runtime pods Ready", both_ready, timeout=300)
    gpus = {(p["spec"]["nodeName"], p["metadata"]["annotations"][wire.POD_GPU_UUID]) for p in pods}
    assert len(gpus) == 1, f"the two halves should share one GPU: {gpus}"
    share = RealNodeShape().gpu_memory_mib * 2**20 // 2
    for pod in pods:
        assert int(pod["metadata"]["annotations"][wire.POD_GPU_MEMORY_REQUEST]) == share
    block_bytes = {}
    for name in ("left", "right"):
        ip = cluster_ip(cluster, name, namespace)
        answer = routed_post(f"http://{ip}:8000/v1/completions",
                             {"model": name, "prompt": "Hi", "max_tokens": 4, "temperature": 0})  # fmt: skip
        assert answer["usage"]["completion_tokens"] == 4
        with urllib.request.urlopen(f"http://{ip}:8000/metrics", timeout=10) as response:
            metrics = response.read().decode()
        gauges = {  # name (labels dropped) -> value
            line.split("{")[0].split(" ")[0]: line.rsplit(" ", 1)[1]
            for line in metrics.splitlines()
            if line.startswith("berth_")
        }
        assert float(gauges["berth_gpu_memory_request_bytes"]) == share
        # The runtime sized its KV pool inside its share (the CPU build bounds a logical pool).
        assert 0 < float(gauges["berth_kv_cache_bytes"]) <= share
        block_bytes[name] = float(gauges["berth_kv_cache_bytes"]) / float(
            gauges["berth_kv_cache_blocks_total"]
        )
    # spec.runtime.kvCacheDtype reached the engine: right's blocks are e4m3, a quarter of
    # fp32's bytes, plus a float32 scale per token and KV head.
    assert block_bytes["left"] / 4 < block_bytes["right"] < block_bytes["left"] / 3, block_bytes
    # Both runtimes leased their shares from the node's agent, on the GPU they were bound to.
    ((_, uuid),) = gpus
    names = {f"{namespace}/{p['metadata']['name']}" for p in pods}

    def leased() -> list[Any] | None:
        ledger = AgentClient(str(AGENT_SOCKET)).ledger()
        (gpu,) = [g for g in ledger.gpus if g.uuid == uuid]
        ours = [t for t in gpu.tenants if t.tenant in names]
        return ours if len(ours) == 2 and all(t.state == "active" for t in ours) else None

    for tenant in wait_for("both runtimes to hold leases from the node agent", leased, timeout=30):
        assert tenant.request_bytes == share and tenant.granted_bytes >= share, tenant
        assert tenant.held_bytes <= tenant.granted_bytes, tenant
    # The node's agent runs with --mps-dir but finds no MPS binary here: the Node says so, and
    # each pod runs as on an MPS node all the same (the node's MPS folder mounted, its shared
    # /dev/shm the sticky world-writable one the agent made), its runtime time-sliced and saying why.
    state = wait_for("the Node's MPS state",
                     lambda: get_json(cluster, "node", NODE_NAME)["metadata"]["annotations"]
                     .get(wire.NODE_MPS), timeout=30)  # fmt: skip
    assert state.startswith("unavailable: nvidia-cuda-mps-control is not on PATH"), state
    for pod in pods:
        name = pod["metadata"]["name"]
        shm = cluster.kubectl("exec", "-n", namespace, name, "--", "stat", "-c", "%a", "/dev/shm")
        assert shm.strip() == "1777", shm
        logs = cluster.kubectl("logs", "-n", namespace, name)
        assert f"NVIDIA MPS off: no MPS control daemon for {uuid}" in logs, logs[-2000:]


def test_deleting_a_pod_mid_stream_drains_it_and_the_stream_ends_cleanly(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str, tiny_model: Path
) -> None:
    apply_docs(cluster, [real_service("drain", namespace, tiny_model)])
    pod = wait_for("the runtime pod Ready", lambda: ready_pod(cluster, namespace), timeout=240)
    ip = cluster_ip(cluster, "drain", namespace)
    routed_post(
        f"http://{ip}:8000/v1/completions", {"model": "drain", "prompt": "x", "max_tokens": 1}
    )
    body = {"model": "drain", "prompt": "Once", "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}  # fmt: skip
    lines: list[str] = []
    error: list[BaseException] = []

    def stream() -> None:
        request = urllib.request.Request(f"http://{ip}:8000/v1/completions",
                                         data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                for raw in response:
                    lines.append(raw.decode().strip())
        except BaseException as e:
            error.append(e)

    reader = threading.Thread(target=stream)
    reader.start()
    wait_for("the first streamed tokens", lambda: len([x for x in lines if x.startswith("data:")]) > 2,
             timeout=60, every=0.1)  # fmt: skip
    cluster.kubectl("delete", "pod", "-n", namespace, pod["metadata"]["name"], "--wait=false")
    reader.join(timeout=150)
    assert not reader.is_alive(), "the stream never ended"
    assert not error, f"the stream broke: {error}"
    assert lines[-1] == "data: [DONE]" or "data: [DONE]" in lines, lines[-5:]


def test_readiness_follows_the_model_and_the_url_appears_only_then(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str, tiny_model: Path
) -> None:
    apply_docs(cluster, [real_service("late", namespace, tiny_model)])
    seen_running_not_ready = False
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        pods = berth_pods(cluster, namespace)
        service = get_json(cluster, "bis", "late", "-n", namespace)
        ready = [p for p in pods if condition(p, "Ready").get("status") == "True"]
        running = [p for p in pods if p["status"].get("phase") == "Running"]
        if running and not ready:
            seen_running_not_ready = True
            assert not (service.get("status") or {}).get("url"), "URL published before Ready"
        if ready:
            break
        time.sleep(0.3)
    assert seen_running_not_ready, "the pod never showed Running before Ready (weights load)"


@pytest.fixture
def model_server(tiny_model: Path, tmp_path: Path) -> Iterator[str]:
    """The tiny model as a .tar.gz over HTTP on the node's address (reachable from pods)."""
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tiny_model, arcname="tiny")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer((NODE_IP, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{NODE_IP}:{server.server_address[1]}/tiny.tar.gz"
    finally:
        server.shutdown()
        server.server_close()


def test_a_uri_model_is_fetched_by_the_init_container_and_served(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str, tiny_model: Path,
    model_server: str,
) -> None:  # fmt: skip
    spec = real_service("fetched", namespace, tiny_model)
    spec["spec"]["model"]["source"] = {"uri": model_server}
    apply_docs(cluster, [spec])
    pod = wait_for(
        "the fetched model's pod Ready", lambda: ready_pod(cluster, namespace), timeout=240
    )
    (init,) = pod["status"]["initContainerStatuses"]
    assert init["name"] == "fetch-model" and init["state"]["terminated"]["exitCode"] == 0
    ip = cluster_ip(cluster, "fetched", namespace)
    answer = routed_post(f"http://{ip}:8000/v1/completions",
                         {"model": "fetched", "prompt": "Hello", "max_tokens": 4, "temperature": 0})  # fmt: skip
    assert answer["usage"]["completion_tokens"] == 4


def test_a_rolling_update_under_load_fails_no_request(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str, tiny_model: Path
) -> None:
    """Surge first, then the old pod drains (preStop, readiness off, in-flight requests finish)
    while kube-proxy moves the Service to the new pod: a client sees no failure."""
    wait_for(
        "earlier tests' pods to leave the real node", lambda: not tenants(cluster), timeout=120
    )
    apply_docs(cluster, [real_service("rolling", namespace, tiny_model)])
    first = wait_for("the first pod Ready", lambda: ready_pod(cluster, namespace), timeout=240)
    ip = cluster_ip(cluster, "rolling", namespace)
    routed_post(
        f"http://{ip}:8000/v1/completions", {"model": "rolling", "prompt": "x", "max_tokens": 1}
    )
    results: list[str] = []
    stop = threading.Event()

    def load() -> None:  # one request at a time, bounded by the test's own deadline
        deadline = time.monotonic() + 300
        while not stop.is_set() and time.monotonic() < deadline:
            body = {"model": "rolling", "prompt": "Hi", "max_tokens": 8, "temperature": 0}
            try:
                post(f"http://{ip}:8000/v1/completions", body, timeout=30)
                results.append("ok")
            except Exception as error:  # every failure is a finding
                results.append(f"{type(error).__name__}: {error}")

    clients = [threading.Thread(target=load) for _ in range(2)]
    for client in clients:
        client.start()
    wait_for("requests flowing", lambda: results.count("ok") >= 4, timeout=60, every=0.2)
    spec = real_service("rolling", namespace, tiny_model)
    spec["spec"]["runtime"]["maxNumSeqs"] = 4  # a new pod template: a rollout
    apply_docs(cluster, [spec])

    def rolled() -> bool:
        pods = berth_pods(cluster, namespace)
        names = {p["metadata"]["name"] for p in pods}
        ready = [p for p in pods if condition(p, "Ready").get("status") == "True"]
        return first["metadata"]["name"] not in names and len(ready) == 1

    wait_for("the rollout to replace the pod", rolled, timeout=300)
    time.sleep(2)
    stop.set()
    for client in clients:
        client.join(timeout=60)
    failures = [r for r in results if r != "ok"]
    assert results.count("ok") > 10
    assert not failures, f"{len(failures)} of {len(results)} requests failed: {failures[:5]}"


def test_a_request_too_small_for_the_weights_is_a_condition_with_the_numbers(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str, smollm2_model: Path
) -> None:
    """The runtime refuses to start inside a share that cannot hold its weights, says why in
    its termination message, and the service's Ready condition carries it (not a bare crash
    loop)."""
    service = real_service("cramped", namespace, smollm2_model)
    service["spec"]["gpu"] = {"memory": {"request": "128Mi"}, "product": PRODUCT}
    apply_docs(cluster, [service])

    def failing() -> dict[str, Any] | None:
        status = get_json(cluster, "bis", "cramped", "-n", namespace).get("status") or {}
        found: dict[str, Any] = next(
            (c for c in status.get("conditions", []) if c["type"] == "Ready"), {}
        )
        return found if found.get("reason") == "RuntimeFailing" else None

    ready: dict[str, Any] = wait_for(
        "the Ready condition to name the failing runtime", failing, timeout=240
    )
    assert ready["status"] == "False"
    assert "cannot hold this model" in ready["message"], ready
    assert "GiB" in ready["message"] and "weights" in ready["message"], ready
