"""``berth smoke-test``: the path a user takes, checked from inside the cluster (``helm test``).

The operator answers through its metrics Service and is ready; then an InferenceService of the
random-weight ``tiny`` model (``model.source.random``: nothing downloaded) is reconciled,
scheduled onto a GPU share, served, Ready, and its Service answers an OpenAI completion. The
service is deleted afterwards, pass or fail. Services are reached by their ClusterIP read from
the API, so the check needs no cluster DNS. Torch-free: it runs from the operator's image.
"""

import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click
import httpx

from berth import wire
from berth.operator.kube import KubeClient, KubeError, resource_path
from berth.operator.render import PORT
from berth.operator.status import condition

Obj = dict[str, Any]
T = TypeVar("T")
SERVICE = (f"{wire.GROUP}/{wire.VERSION}", "InferenceService")


class SmokeTestFailed(click.ClickException):
    """A step did not reach its state in time; the message says which and what it last saw."""


def smoke_service(name: str, namespace: str, fraction: float, pod: Obj) -> Obj:
    """The InferenceService the check applies."""
    return {
        "apiVersion": SERVICE[0],
        "kind": SERVICE[1],
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"source": {"random": {"shape": "tiny"}}},
            "gpu": {"fraction": fraction},
            "replicas": 1,
            "maxReplicas": 1,
            "pod": pod,
        },
    }


def _until(what: str, check: Callable[[], T | None], deadline: float, seen: Callable[[], str]) -> T:
    while time.monotonic() < deadline:
        found = check()
        if found is not None:
            return found
        time.sleep(2)
    raise SmokeTestFailed(f"timed out waiting for {what}; last seen: {seen()}")


def cluster_ip(client: KubeClient, namespace: str, name: str) -> str:
    service = client.get(resource_path("v1", "Service", namespace, name))
    address: str = service["spec"]["clusterIP"]
    return address


def check_operator(
    client: KubeClient, namespace: str, service: str, port: int, deadline: float
) -> None:
    base = f"http://{cluster_ip(client, namespace, service)}:{port}"
    last = [""]

    def answers() -> bool | None:
        try:
            httpx.get(f"{base}/readyz", timeout=5).raise_for_status()
            metrics = httpx.get(f"{base}/metrics", timeout=5).text
        except httpx.HTTPError as error:
            last[0] = str(error)
            return None
        if "berth_scheduler_binds_total" not in metrics:
            last[0] = "/metrics lacks berth_scheduler_binds_total"
            return None
        return True

    _until(f"the operator ready at {base}", answers, deadline, lambda: last[0])
    click.echo(f"operator ready at {base}")


def check_model(client: KubeClient, manifest: Obj, deadline: float) -> Obj:
    """Apply the service, wait for Ready, ask for a completion; return the answer."""
    meta = manifest["metadata"]
    path = resource_path(*SERVICE, meta["namespace"], meta["name"])
    state: Obj = {}

    def ready() -> Obj | None:
        state.update(client.get(path))
        return state if condition(state, "Ready").get("status") == "True" else None

    client.apply(manifest)
    click.echo(f"applied InferenceService {meta['namespace']}/{meta['name']} (random tiny model)")
    _until(
        "the InferenceService to be Ready",
        ready,
        deadline,
        lambda: json.dumps(state.get("status", {}).get("conditions", [])),
    )
    click.echo("InferenceService Ready")
    url = f"http://{cluster_ip(client, meta['namespace'], meta['name'])}:{PORT}/v1/completions"
    body = {"model": meta["name"], "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    answer: Obj = httpx.post(url, json=body, timeout=60).raise_for_status().json()
    if answer.get("usage", {}).get("completion_tokens") != 4:
        raise SmokeTestFailed(f"{url} answered without 4 completion tokens: {answer}")
    click.echo(f"completion through {url}: {answer['usage']['completion_tokens']} tokens")
    return answer


@click.command("smoke-test")
@click.option(
    "--namespace", required=True, help="Where the operator's Service and the test service live."
)
@click.option("--operator-service", required=True, help="The operator's metrics Service.")
@click.option("--operator-port", type=int, required=True, help="Its port (/readyz, /metrics).")
@click.option("--name", default="berth-smoke-test", show_default=True,
              help="Name of the InferenceService to apply (deleted afterwards).")  # fmt: skip
@click.option("--fraction", type=click.FloatRange(0.01, 1.0), default=0.1, show_default=True,
              help="GPU fraction of the test service.")  # fmt: skip
@click.option("--pod", "pod_json", default="{}", show_default=True,
              help="spec.pod of the test service as JSON (nodeSelector, tolerations).")  # fmt: skip
@click.option("--operator-only", is_flag=True, help="Check the operator, apply no service.")
@click.option("--timeout", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="Seconds for the whole check.")  # fmt: skip
def smoke_test(
    namespace: str,
    operator_service: str,
    operator_port: int,
    name: str,
    fraction: float,
    pod_json: str,
    operator_only: bool,
    timeout: float,
) -> None:
    """Check an installation end to end from inside the cluster (what `helm test` runs)."""
    try:
        pod = json.loads(pod_json)
    except json.JSONDecodeError as error:
        raise click.BadParameter(f"not JSON: {error}", param_hint="--pod") from error
    if not isinstance(pod, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--pod")
    deadline = time.monotonic() + timeout
    client = KubeClient.from_config(pool=2)
    try:
        check_operator(client, namespace, operator_service, operator_port, deadline)
        if operator_only:
            return
        manifest = smoke_service(name, namespace, fraction, pod)
        try:
            check_model(client, manifest, deadline)
        finally:
            try:
                client.delete(resource_path(*SERVICE, namespace, name))
            except KubeError as error:
                if error.status != 404:
                    raise
    except (KubeError, httpx.HTTPError) as error:
        raise SmokeTestFailed(str(error)) from error
    finally:
        client.close()
