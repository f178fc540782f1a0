"""A real Prometheus for tests (Debian's ``prometheus``, installed by the Makefile): on loopback,
with a temporary store, from a scrape configuration the test writes (``serving``), or scraping
the runtime pods of one namespace every second with the ``namespace`` and ``pod`` labels that
Kubernetes setups put on such series (``running_prometheus``).

Debian builds Prometheus without its Kubernetes service discovery (``kubernetes_sd_configs`` is
an unknown field there), so the pods reach it through file-based discovery: a thread lists them
from the API server every second and rewrites the targets file, which Prometheus watches."""

import contextlib
import json
import shutil
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
from berth.cluster.cluster import LocalCluster, free_port

BINARY = shutil.which("prometheus")
START_TIMEOUT_S = 60.0
QUERY_LOG = "queries.log"  # one JSON line per query answered


@contextmanager
def serving(config: dict[str, Any], folder: Path) -> Iterator[str]:
    """Prometheus with ``config``, its store and log in ``folder``; yields its URL once it is
    ready, and stops it however the test ends."""
    assert BINARY, "Debian's prometheus package is not installed (make system installs it)"
    path = folder / "prometheus.yml"
    path.write_text(json.dumps(config))  # JSON is YAML
    url = f"http://127.0.0.1:{free_port()}"
    log = (folder / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [BINARY, f"--config.file={path}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address={url.removeprefix('http://')}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
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
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


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
    """Prometheus scraping the namespace's runtime pods every second; yields its URL. Every
    query it answers is logged to ``folder / QUERY_LOG``."""
    targets = folder / "targets.json"
    targets.write_text(json.dumps(pod_targets(cluster, namespace, port)))
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s",
                   "query_log_file": str(folder / QUERY_LOG)},
        "scrape_configs": [{
            "job_name": "berth-runtimes",
            "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}],
        }],
    }  # fmt: skip
    stop = threading.Event()
    discovery = threading.Thread(
        target=_discover, args=(cluster, namespace, port, targets, stop), daemon=True
    )
    discovery.start()
    try:
        with serving(config, folder) as url:
            yield url
    finally:
        stop.set()
        discovery.join(timeout=10)


def query(url: str, promql: str) -> list[dict[str, Any]]:
    """An instant query's result vector."""
    params = urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(f"{url}/api/v1/query?{params}", timeout=5) as response:
        result: list[dict[str, Any]] = json.loads(response.read())["data"]["result"]
        return result


def per_pod(url: str, promql: str) -> dict[str, float]:
    """An instant query's values by their ``pod`` label."""
    return {s["metric"]["pod"]: float(s["value"][1]) for s in query(url, promql)}
