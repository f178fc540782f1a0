"""A thin, thread-safe Kubernetes REST client over JSON dicts (httpx).

The generated ``kubernetes`` models cost milliseconds per pod to deserialize; the scheduler
handles thousands of pods, so it speaks plain JSON. The ``kubernetes`` package is used only to
read kubeconfig / in-cluster credentials.
"""

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from berth import wire

if TYPE_CHECKING:
    from berth.operator.health import LoopHealth

Obj = dict[str, Any]
log = logging.getLogger(__name__)

# (apiVersion, kind) -> plural, for the kinds Berth reads and writes.
PLURALS: dict[tuple[str, str], str] = {
    ("v1", "Pod"): "pods",
    ("v1", "Node"): "nodes",
    ("v1", "Service"): "services",
    ("v1", "Secret"): "secrets",
    ("v1", "Event"): "events",
    ("v1", "Namespace"): "namespaces",
    ("apps/v1", "Deployment"): "deployments",
    ("apps/v1", "ReplicaSet"): "replicasets",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    ("cilium.io/v2", "CiliumNetworkPolicy"): "ciliumnetworkpolicies",
    ("cilium.io/v1alpha1", "TracingPolicyNamespaced"): "tracingpoliciesnamespaced",
    (f"{wire.GROUP}/{wire.VERSION}", "InferenceService"): "inferenceservices",
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"): "customresourcedefinitions",
}
CLUSTER_SCOPED = {"Node", "Namespace", "CustomResourceDefinition"}


class KubeError(RuntimeError):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


def resource_path(
    api_version: str, kind: str, namespace: str | None = None, name: str | None = None
) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = base
    if namespace and kind not in CLUSTER_SCOPED:
        path += f"/namespaces/{namespace}"
    path += f"/{PLURALS[(api_version, kind)]}"
    return f"{path}/{name}" if name else path


def object_path(obj: Obj) -> str:
    meta = obj["metadata"]
    return resource_path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])


class KubeClient:
    """One connection pool to one API server; safe to share between threads."""

    def __init__(
        self,
        server: str,
        verify: str | bool,
        cert: tuple[str, str] | None,
        token: str | None,
        pool: int = 32,
    ) -> None:
        self.server, self.verify, self.cert, self.token = server, verify, cert, token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(
            base_url=server,
            verify=verify,
            cert=cert,
            headers=headers,
            timeout=httpx.Timeout(30.0),
            limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
        )

    @classmethod
    def from_config(cls, kubeconfig: Path | None = None, pool: int = 32) -> "KubeClient":
        """Credentials from ``kubeconfig``, else $KUBECONFIG / ~/.kube/config, else in-cluster."""
        cfg = k8s_client.Configuration()
        path = kubeconfig or os.environ.get("KUBECONFIG")
        if path or Path("~/.kube/config").expanduser().exists():
            k8s_config.load_kube_config(
                config_file=str(path) if path else None, client_configuration=cfg
            )
        else:
            k8s_config.load_incluster_config(client_configuration=cfg)
        token = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
        if token and token.lower().startswith("bearer "):
            token = token.split(" ", 1)[1]
        verify: str | bool = cfg.ssl_ca_cert or cfg.verify_ssl
        cert = (cfg.cert_file, cfg.key_file) if cfg.cert_file and cfg.key_file else None
        return cls(cfg.host, verify, cert, token, pool)

    def close(self) -> None:
        self.http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        decode: bool = True,
    ) -> Obj:
        """One request; the response's JSON when ``decode`` (writes skip it: an applied
        Deployment comes back with its managed fields, and parsing it was a tenth of the
        reconciler's CPU)."""
        content = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if content is not None else {}
        response = self.http.request(method, path, params=params, content=content, headers=headers)
        if response.status_code >= 400:
            raise _error(response.status_code, response.text)
        result: Obj = response.json() if decode and response.content else {}
        return result

    def get(self, path: str, **params: str) -> Obj:
        return self.request("GET", path, params=params or None)

    def post(self, path: str, body: Obj) -> None:
        self.request("POST", path, body=body, decode=False)

    def create(self, path: str, body: Obj) -> Obj:
        """POST and return the created object (its generated name, uid, resourceVersion)."""
        return self.request("POST", path, body=body)

    def delete(self, path: str, grace_period_s: int | None = None) -> None:
        params = {"propagationPolicy": "Background"}
        if grace_period_s is not None:
            params["gracePeriodSeconds"] = str(grace_period_s)
        self.request("DELETE", path, params=params, decode=False)

    def merge_patch(self, path: str, body: Obj) -> None:
        content_type = "application/merge-patch+json"
        self.request("PATCH", path, body=body, content_type=content_type, decode=False)

    def strategic_patch(self, path: str, body: Obj) -> None:
        content_type = "application/strategic-merge-patch+json"
        self.request("PATCH", path, body=body, content_type=content_type, decode=False)

    def apply(self, obj: Obj, force: bool = True) -> None:
        """Server-side apply as field manager ``berth``."""
        params = {"fieldManager": wire.FIELD_MANAGER, "force": "true" if force else "false"}
        content_type = "application/apply-patch+yaml"
        self.request("PATCH", object_path(obj), params=params, body=obj,
                     content_type=content_type, decode=False)  # fmt: skip

    def watch(
        self, path: str, resource_version: str, timeout_s: int = 240, **params: str
    ) -> Iterator[tuple[str, Obj]]:
        """Yield (type, object) until the server closes the watch; raises KubeError(410) when stale."""
        query = {
            **params,
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_s),
        }
        timeout = httpx.Timeout(30.0, read=timeout_s + 30.0)
        with self.http.stream("GET", path, params=query, timeout=timeout) as response:
            if response.status_code >= 400:
                raise _error(response.status_code, response.read().decode())
            for line in response.iter_lines():
                if not line:
                    continue
                event = json.loads(line)
                if event["type"] == "ERROR":
                    status = event["object"]
                    raise KubeError(
                        status.get("code", 500), status.get("reason", ""), status.get("message", "")
                    )
                yield event["type"], event["object"]


def _error(status: int, text: str) -> KubeError:
    try:
        body = json.loads(text)
        return KubeError(status, body.get("reason", ""), body.get("message", text))
    except ValueError:
        return KubeError(status, "", text)


ErrorHandler = Callable[[Obj, Exception], None]


def describe(obj: Obj) -> str:
    """``Kind namespace/name`` of an object, for logs about it."""
    meta = obj.get("metadata") or {}
    where = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj.get('kind', 'object')} {where}{meta.get('name', '?')}"


def reflect(
    client: KubeClient,
    path: str,
    on_list: Callable[[list[Obj]], None],
    on_event: Callable[[str, Obj], None],
    stop: threading.Event,
    *,
    health: "LoopHealth | None" = None,
    on_error: ErrorHandler | None = None,
    **params: str,
) -> None:
    """List, then watch from the list's resourceVersion, until ``stop`` is set (checked whenever
    the server ends a watch, at most every 60 s).

    As client-go's reflector: a watch that breaks (connection error, 429, 5xx) is re-opened from
    the last resourceVersion seen, after a backoff; only 410 Gone (the version is too old) or an
    unexpected failure relists, so callers see a complete picture after each ``on_list``.
    A handler that raises never ends the loop: the object is logged by name, counted, and handed
    to ``on_error`` (which reports it on the object), and the watch goes on with the next one.
    ``on_list`` is expected to guard its items itself; if it raises, the loop relists after a
    backoff. ``health`` is beaten on every event and marked synced after the first list.
    """
    backoff = _Backoff()
    version: str | None = None
    while not stop.is_set():
        if health:
            health.beat()  # alive and trying, even while the API server is away
        try:
            if version is None:
                listing = client.get(path, **params)
                on_list(listing.get("items") or [])
                version = listing["metadata"]["resourceVersion"]
                if health:
                    health.mark_synced()
            for kind, obj in client.watch(path, version, timeout_s=60, **params):
                version = obj.get("metadata", {}).get("resourceVersion", version)
                if health:
                    health.beat()
                if kind != "BOOKMARK":
                    _handle(on_event, kind, obj, path, health, on_error)
                if stop.is_set():
                    return
            backoff.reset()
            if health:
                health.beat()
        except KubeError as error:
            if error.status == 410:
                version = None  # too old to watch from: relist at once
            else:
                log.warning("watch %s failed: %s; watching again", path, error)
                stop.wait(backoff.next())
            if health:
                health.restarted()
        except httpx.HTTPError as error:
            log.warning("watch %s broke: %s; watching again", path, error)
            if health:
                health.restarted()
            stop.wait(backoff.next())
        except Exception:  # a bug in on_list, or a garbled stream: start over from a list
            log.exception("watch %s failed; relisting", path)
            version = None
            if health:
                health.restarted()
            stop.wait(backoff.next())


def _handle(
    on_event: Callable[[str, Obj], None],
    kind: str,
    obj: Obj,
    path: str,
    health: "LoopHealth | None",
    on_error: ErrorHandler | None,
) -> None:
    try:
        on_event(kind, obj)
    except Exception as error:
        report_bad_object(obj, error, f"watch {path}", health, on_error)


def report_bad_object(
    obj: Obj,
    error: Exception,
    where: str,
    health: "LoopHealth | None",
    on_error: ErrorHandler | None,
) -> None:
    """Log, count and report an object a handler failed on; never raises."""
    log.error("%s: cannot handle %s: %s", where, describe(obj), error, exc_info=error)
    if health:
        health.handler_error()
    if on_error is not None:
        try:
            on_error(obj, error)
        except Exception:
            log.exception("%s: reporting the failure on %s failed too", where, describe(obj))


class _Backoff:
    """0.5 s doubling to 10 s; reset once a watch ends cleanly."""

    def __init__(self) -> None:
        self.delay = 0.5

    def next(self) -> float:
        delay, self.delay = self.delay, min(self.delay * 2, 10.0)
        return delay

    def reset(self) -> None:
        self.delay = 0.5
