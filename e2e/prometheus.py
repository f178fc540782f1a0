"""A real Prometheus for end-to-end tests (Debian's ``prometheus``, installed by the Makefile):
on loopback, with a temporary store, scraping the runtime pods of one namespace every second,
with the ``namespace`` and ``pod`` labels that Kubernetes setups put on such series.

Debian builds Prometheus without its Kubernetes service discovery (``kubernetes_sd_configs`` is
an unknown field there), so the pods reach it through file-based discovery: a thread lists them
from the API server every second and rewrites the targets file, which Prometheus watches."""

import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from berth import wire
from berth.cluster.cluster import LocalCluster

BINARY = shutil.which("prometheus")


def scrape_config(targets: Path) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{
            "job_name": "berth-runtimes",
            "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}],
        }],
    }  # fmt: skip


def pod_targets(cluster: LocalCluster, namespace: str, port: int) -> list[dict[str, Any]]:
    """File-discovery entries for every running pod of an InferenceService in ``namespace``."""
    pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-l", wire.LABEL_SERVICE,
                                      "-o", "json"))["items"]  # fmt: skip
    return [
        {"targets": [f"{pod['status']['podIP']}:{port}"],
         "labels": {"namespace": namespace, "pod": pod["metadata"]["name"]}}
        for pod in pods
        if pod.get("status", {}).get("podIP") and not pod["metadata"].get("deletionTimestamp")
    ]  # fmt: skip


def _discover(
    cluster: LocalCluster, namespace: str, port: int, targets: Path, stop: threading.Event
) -> None:
    while not stop.wait(1.0):
        with contextlib.suppress(Exception):  # an API hiccup: keep the last targets
            fresh = targets.with_suffix(".tmp")
            fresh.write_text(json.dumps(pod_targets(cluster, namespace, port)))
            fresh.replace(targets)


@contextmanager
def running_prometheus(
    cluster: LocalCluster, namespace: str, port: int, folder: Path
) -> Iterator[str]:
    """Prometheus scraping the namespace's runtime pods; yields its URL once it answers."""
    assert BINARY, "Debian's prometheus package is not installed (make system installs it)"
    targets = folder / "targets.json"
    targets.write_text(json.dumps(pod_targets(cluster, namespace, port)))
    config = folder / "prometheus.yml"
    config.write_text(json.dumps(scrape_config(targets)))
    stop = threading.Event()
    discovery = threading.Thread(
        target=_discover, args=(cluster, namespace, port, targets, stop), daemon=True
    )
    discovery.start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        listen = probe.getsockname()[1]
    log = (folder / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [BINARY, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address=127.0.0.1:{listen}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{listen}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2):
                    break
            except OSError as error:
                if time.monotonic() > deadline or process.poll() is not None:
                    why = f"Prometheus did not start; see {folder / 'prometheus.log'}"
                    raise RuntimeError(why) from error
                time.sleep(0.3)
        yield url
    finally:
        stop.set()
        discovery.join(timeout=10)
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def query(url: str, promql: str) -> list[dict[str, Any]]:
    """An instant query's result vector."""
    params = urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(f"{url}/api/v1/query?{params}", timeout=5) as response:
        result: list[dict[str, Any]] = json.loads(response.read())["data"]["result"]
        return result
