"""The single writer of InferenceService status, fed by its own watches of services, Deployments
and pods.

Status is observation: ``status.service_status`` computes it from summaries of a service's
Deployment and pods. Those summaries come from plain JSON reflectors (``kube.reflect``), not from
kopf: a pod changes several times in its life, and kopf's per-event machinery (diff bases, cause
detection, handler bookkeeping) cost the operator about 20 ms of CPU per event under load, more
than the API server spent on the write that caused it. A change is acted on only when it changes
a summary (a kubelet heartbeat on a pod does not), and a service's status is written at most
every ``MIN_WRITE_INTERVAL_S``, only when it differs from what was last written, by a few writer
threads that never hold the lock over a request.
"""

import functools
import heapq
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from berth import wire
from berth.operator import api, render, sandbox
from berth.operator.events import now_rfc3339
from berth.operator.kube import KubeClient, KubeError, Obj, reflect, resource_path
from berth.operator.status import (
    ApplyFailure,
    DeploymentSummary,
    PodSummary,
    ServiceView,
    service_status,
    summarize_deployment,
    summarize_pod,
)

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (namespace, InferenceService name)
REFRESH_DELAY_S = 0.5  # changes that arrive together (a pod and its Deployment) make one write
MIN_WRITE_INTERVAL_S = 2.0  # and one service's status is written at most this often
WRITERS = 4


@dataclass(frozen=True)
class ServiceInfo:
    uid: str
    generation: int
    desired_replicas: int
    url: str
    status: Obj
    not_acted_on: tuple[str, ...] = ()
    hosts_note: str | None = None
    autoscaled: bool = False


def service_info(
    obj: Obj, previous: ServiceInfo | None, engines: sandbox.PolicyEngines = sandbox.NO_ENGINES
) -> ServiceInfo:
    """What the status needs from an InferenceService; the spec is parsed once per generation."""
    meta = obj["metadata"]
    generation = meta.get("generation", 0)
    if previous and previous.uid == meta.get("uid") and previous.generation == generation:
        desired, ignored = previous.desired_replicas, previous.not_acted_on
        hosts, autoscaled = previous.hosts_note, previous.autoscaled
    else:
        try:
            spec = api.InferenceServiceSpec.model_validate(obj.get("spec") or {})
            desired, ignored = spec.desired_replicas(), api.fields_not_acted_on(spec)
            hosts = sandbox.hosts_note(spec.sandbox, engines)
            autoscaled = spec.autoscaling is not None and spec.autoscaling.mode == "berth"
        except ValidationError:
            desired, ignored, hosts, autoscaled = 0, (), None, False
    url = f"http://{meta['name']}.{meta['namespace']}.svc:{render.PORT}/v1"
    status = obj.get("status") or {}
    return ServiceInfo(
        meta.get("uid", ""), generation, desired, url, status, ignored, hosts, autoscaled
    )


class StatusBoard:
    def __init__(
        self,
        client: KubeClient,
        namespaces: tuple[str, ...] = (),
        engines: sandbox.PolicyEngines = sandbox.NO_ENGINES,
    ) -> None:
        self.client, self.namespaces, self.engines = client, namespaces, engines
        self.lock = threading.Condition()
        self.stop = threading.Event()
        self.services: dict[Key, ServiceInfo] = {}
        self.deployments: dict[Key, DeploymentSummary] = {}
        self.pods: dict[Key, dict[str, PodSummary]] = {}
        self.render_errors: dict[Key, tuple[int, ApplyFailure]] = {}  # key -> (generation, why)
        self.written: dict[Key, Obj] = {}
        self.written_at: dict[Key, float] = {}
        self.due: dict[Key, float] = {}  # key -> monotonic time its refresh is due
        self.queue: list[tuple[float, Key]] = []
        self.in_flight: set[Key] = set()
        self.threads: list[threading.Thread] = []

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        selector = {"labelSelector": wire.LABEL_SERVICE}
        watches: list[tuple[str, str, Callable[[str | None, list[Obj]], None], Callable[[str, Obj], None], dict[str, str]]] = [
            ("services", f"{wire.GROUP}/{wire.VERSION}", self._services_listed, self._service_event, {}),
            ("deployments", "apps/v1", self._deployments_listed, self._deployment_event, selector),
            ("pods", "v1", self._pods_listed, self._pod_event, selector),
        ]  # fmt: skip
        kinds = {"services": api.KIND, "deployments": "Deployment", "pods": "Pod"}
        for name, api_version, listed, changed, params in watches:
            for namespace in self.namespaces or (None,):
                path = resource_path(api_version, kinds[name], namespace)
                on_list = functools.partial(listed, namespace)
                self.threads.append(threading.Thread(
                    target=reflect, name=f"status-watch-{name}", daemon=True,
                    args=(self.client, path, on_list, changed, self.stop), kwargs=params))  # fmt: skip
        for i in range(WRITERS):
            self.threads.append(
                threading.Thread(target=self._writer, name=f"status-write-{i}", daemon=True)
            )
        for thread in self.threads:
            thread.start()

    def shutdown(self) -> None:
        self.stop.set()
        with self.lock:
            self.lock.notify_all()

    # ---- inputs --------------------------------------------------------------------------

    def render_error(self, key: Key, generation: int, failure: ApplyFailure | None) -> None:
        """The API server did not take this generation's objects (``failure``), or took them."""
        with self.lock:
            if failure is None:
                if self.render_errors.pop(key, None) is not None:
                    self._mark(key)
                return
            if self.render_errors.get(key) != (generation, failure):
                self.render_errors[key] = (generation, failure)
                self._mark(key)

    def _services_listed(self, namespace: str | None, items: list[Obj]) -> None:
        """A (re)list of one namespace's services (all namespaces when None)."""
        with self.lock:
            listed = {_key(obj): obj for obj in items}
            for key in [k for k in self.services if _in(k, namespace) and k not in listed]:
                self._forget(key)
            for key, obj in listed.items():
                self.services[key] = service_info(obj, self.services.get(key), self.engines)
                self._mark(key)

    def _service_event(self, kind: str, obj: Obj) -> None:
        key = _key(obj)
        with self.lock:
            if kind == "DELETED":
                self._forget(key)
                return
            old = self.services.get(key)
            info = service_info(obj, old, self.engines)
            self.services[key] = info
            ours = info.status == self.written.get(key)  # our own write coming back
            if old is None or old.generation != info.generation or not ours:
                self._mark(key)

    def _deployments_listed(self, namespace: str | None, items: list[Obj]) -> None:
        with self.lock:
            for key in [k for k in self.deployments if _in(k, namespace)]:
                del self.deployments[key]
            for obj in items:
                self.deployments[_owner(obj)] = summarize_deployment(obj)
                self._mark(_owner(obj))

    def _deployment_event(self, kind: str, obj: Obj) -> None:
        key = _owner(obj)
        with self.lock:
            summary = None if kind == "DELETED" else summarize_deployment(obj)
            if self.deployments.get(key) == summary:
                return
            if summary is None:
                self.deployments.pop(key, None)
            else:
                self.deployments[key] = summary
            self._mark(key)

    def _pods_listed(self, namespace: str | None, items: list[Obj]) -> None:
        with self.lock:
            for key in [k for k in self.pods if _in(k, namespace)]:
                del self.pods[key]
            for obj in items:
                self.pods.setdefault(_owner(obj), {})[obj["metadata"]["name"]] = summarize_pod(obj)
                self._mark(_owner(obj))

    def _pod_event(self, kind: str, obj: Obj) -> None:
        key, name = _owner(obj), obj["metadata"]["name"]
        with self.lock:
            summary = None if kind == "DELETED" else summarize_pod(obj)
            if self.pods.get(key, {}).get(name) == summary:
                return
            if summary is not None:
                self.pods.setdefault(key, {})[name] = summary
            elif len(self.pods[key]) > 1:
                del self.pods[key][name]
            else:
                del self.pods[key]
            self._mark(key)

    # ---- refresh -------------------------------------------------------------------------

    def _mark(self, key: Key) -> None:
        """Schedule a refresh of ``key`` (lock held); one pending refresh per service."""
        if key in self.due:
            return
        now = time.monotonic()
        when = max(now + REFRESH_DELAY_S, self.written_at.get(key, -1e9) + MIN_WRITE_INTERVAL_S)
        self.due[key] = when
        heapq.heappush(self.queue, (when, key))
        self.lock.notify()

    def _forget(self, key: Key) -> None:
        for table in (self.services, self.deployments, self.pods, self.render_errors):
            table.pop(key, None)
        self.written.pop(key, None)
        self.written_at.pop(key, None)

    def _next(self) -> tuple[Key, ServiceView, Obj] | None:
        """Wait for the next due service and take a consistent view of it (lock held)."""
        while not self.stop.is_set():
            now = time.monotonic()
            if self.queue and self.queue[0][0] <= now:
                when, key = heapq.heappop(self.queue)
                if self.due.get(key) != when:
                    continue  # superseded entry
                del self.due[key]
                if key in self.in_flight:  # another writer has it: look again after it
                    self.due[key] = now + REFRESH_DELAY_S
                    heapq.heappush(self.queue, (self.due[key], key))
                    continue
                info = self.services.get(key)
                if info is None:
                    continue
                view = ServiceView(
                    generation=info.generation,
                    desired_replicas=info.desired_replicas,
                    url=info.url,
                    selector=f"{wire.LABEL_SERVICE}={key[1]}",
                    deployment=self.deployments.get(key),
                    pods=list(self.pods.get(key, {}).values()),
                    not_acted_on=info.not_acted_on,
                    hosts_note=info.hosts_note,
                    autoscaled=info.autoscaled,
                    last_decision=info.status.get("lastDecision"),
                )
                error = self.render_errors.get(key)
                if error and error[0] == info.generation:
                    view.render_error = error[1]
                self.in_flight.add(key)
                return key, view, self.written.get(key) or info.status
            self.lock.wait(timeout=self.queue[0][0] - now if self.queue else None)
        return None

    def _writer(self) -> None:
        while True:
            with self.lock:
                taken = self._next()
            if taken is None:
                return
            self._refresh(*taken)

    def _refresh(self, key: Key, view: ServiceView, previous: Obj) -> None:
        written = False
        try:
            written = self._write(key, view, previous)
        except Exception:  # keep writing the others
            log.exception("status of %s/%s not written", *key)
        with self.lock:
            self.in_flight.discard(key)
            if not written and key in self.services:
                self._mark(key)  # try again after the write interval

    def _write(self, key: Key, view: ServiceView, previous: Obj) -> bool:
        """Write the status if it changed; False when a write was due but failed."""
        status = service_status(view, previous, now_rfc3339())
        if _same(previous, status):
            return True
        path = resource_path(f"{wire.GROUP}/{wire.VERSION}", api.KIND, *key) + "/status"
        with self.lock:
            self.written_at[key] = time.monotonic()
        try:
            self.client.merge_patch(path, {"status": status})
        except KubeError as error:
            if error.status == 404:  # the service is gone; its DELETED event follows
                return True
            log.warning("status of %s/%s not written: %s", *key, error)
            return False
        with self.lock:
            if key in self.services:
                self.written[key] = status
        return True


def _key(obj: Obj) -> Key:
    return obj["metadata"].get("namespace") or "default", obj["metadata"]["name"]


def _in(key: Key, namespace: str | None) -> bool:
    return namespace is None or key[0] == namespace


def _owner(obj: Obj) -> Key:
    """The InferenceService a Deployment or pod belongs to, by its label."""
    labels = obj["metadata"].get("labels") or {}
    return obj["metadata"].get("namespace") or "default", labels[wire.LABEL_SERVICE]


def _same(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    return bool(old) and all(old.get(k) == v for k, v in new.items())  # type: ignore[union-attr]
