"""kopf handlers: InferenceService -> Deployment, Service, PodDisruptionBudget, and its status.

One handler renders and applies (server-side apply, field manager ``berth``, owner references,
so the garbage collector cleans up on delete and a restart re-applies identical objects: no
churn). Status has one writer, ``StatusBoard``: events on the service's pods and Deployment mark
it dirty, and a coalesced refresh computes ``status.service_status`` from kopf's in-memory
indices and patches the status subresource only when it changed, at most every 2 s per service
(each write is also an event that kopf processes, so fewer writes is less CPU on both sides).

A spec that the API server admits but whose rendered objects it refuses (say, CPU requests above
limits) is a ``PermanentError`` for that generation and an ``InvalidSpec`` condition, not a retry
loop; transient API failures are ``TemporaryError`` and retried with a delay.
"""

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf
from pydantic import ValidationError

from berth import wire
from berth.operator import api, render
from berth.operator.events import now_rfc3339, record_event
from berth.operator.kube import KubeClient, KubeError, resource_path
from berth.operator.settings import OperatorSettings
from berth.operator.status import (
    GENERATION_ANNOTATION,
    ServiceView,
    service_status,
    summarize_deployment,
    summarize_pod,
)

log = logging.getLogger(__name__)
RESOURCE = (wire.GROUP, wire.VERSION, api.PLURAL)
REFRESH_DELAY_S = 0.5  # changes that arrive together (a pod and its Deployment) make one write
MIN_WRITE_INTERVAL_S = 2.0  # and one service's status is written at most this often
Key = tuple[str, str]  # (namespace, InferenceService name)


class StatusBoard:
    """The single writer of InferenceService status; coalesces refreshes per service."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client
        self.due: set[Key] = set()
        self.written: dict[Key, dict[str, Any]] = {}
        self.written_at: dict[Key, float] = {}  # loop time of each service's last status write
        self.render_errors: dict[Key, tuple[int, str]] = {}  # key -> (generation, message)

    def touch(self, key: Key, indices: dict[str, Any]) -> None:
        if key in self.due:
            return
        self.due.add(key)
        loop = asyncio.get_running_loop()
        next_write = self.written_at.get(key, -MIN_WRITE_INTERVAL_S) + MIN_WRITE_INTERVAL_S
        delay = max(REFRESH_DELAY_S, next_write - loop.time())
        loop.call_later(delay, lambda: asyncio.ensure_future(self.refresh(key, indices)))

    async def refresh(self, key: Key, indices: dict[str, Any]) -> None:
        self.due.discard(key)
        services, deployments, pods = (
            indices["services_index"],
            indices["deployments_index"],
            indices["pods_index"],
        )
        if key not in services:
            self.written.pop(key, None)
            self.written_at.pop(key, None)
            return
        (body,) = list(services[key])
        view = ServiceView(
            generation=body["generation"],
            desired_replicas=body["desired"],
            url=body["url"],
            selector=f"{wire.LABEL_SERVICE}={key[1]}",
            deployment=next(iter(deployments.get(key, [])), None),
            pods=list(pods.get(key, [])),
        )
        error = self.render_errors.get(key)
        if error and error[0] == view.generation:
            view.render_error = error[1]
        status = service_status(view, body["status"], now_rfc3339())
        if self.written.get(key) == status or _same(body["status"], status):
            return
        path = resource_path(f"{wire.GROUP}/{wire.VERSION}", api.KIND, *key) + "/status"
        try:
            self.written_at[key] = asyncio.get_running_loop().time()
            await asyncio.to_thread(self.client.merge_patch, path, {"status": status})
            self.written[key] = status
        except KubeError as error:
            if error.status != 404:
                log.warning("status of %s/%s not written: %s", *key, error)


def _same(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    return bool(old) and all(old.get(k) == v for k, v in new.items())  # type: ignore[union-attr]


class Context:
    """Process-wide state the handlers share, set once by ``configure``."""

    settings: OperatorSettings
    client: KubeClient
    board: StatusBoard


def configure(settings: OperatorSettings, client: KubeClient) -> None:
    Context.settings, Context.client, Context.board = settings, client, StatusBoard(client)
    logging.getLogger("kopf.objects").addFilter(QuietWatchers())


class QuietWatchers(logging.Filter):
    """Drops kopf's "Handler 'x' succeeded." line for the status watchers: they run on every
    pod and Deployment event (over 15 lines per service at start-up), and formatting and writing
    those lines cost the operator more CPU than the handlers themselves."""

    WATCHERS = ("pod_changed", "deployment_changed", "service_changed")
    LINES = frozenset(f"Handler {name!r} succeeded." for name in WATCHERS)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or record.getMessage() not in self.LINES


@kopf.on.startup()
async def tune_kopf(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Keep kopf's bookkeeping in annotations, so the status subresource is ours alone; give
    blocking API calls (``asyncio.to_thread``) enough threads for thousands of services."""
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(Context.settings.api_threads, thread_name_prefix="api")
    )
    prefix = f"kopf.{wire.GROUP}"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=prefix, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 120
    settings.networking.request_timeout = 60


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf connects with the same credentials as the rest of the process."""
    client = Context.client
    return kopf.ConnectionInfo(
        server=client.server,
        ca_path=client.verify if isinstance(client.verify, str) else None,
        insecure=client.verify is False,
        token=client.token,
        scheme="Bearer" if client.token else None,
        certificate_path=client.cert[0] if client.cert else None,
        private_key_path=client.cert[1] if client.cert else None,
    )


# ---- indices: the in-memory picture the status is computed from ------------------------


@kopf.index(*RESOURCE)
def services_index(
    *, namespace: str | None, name: str, body: kopf.Body, meta: kopf.Meta, **_: Any
) -> dict[Key, dict[str, Any]]:
    namespace = namespace or "default"
    try:
        desired = api.InferenceServiceSpec.model_validate(body.get("spec", {})).desired_replicas()
    except ValidationError:
        desired = 0
    url = f"http://{name}.{namespace}.svc:{render.PORT}/v1"
    return {
        (namespace, name): {
            "generation": meta.get("generation", 0),
            "desired": desired,
            "url": url,
            "status": dict(body.get("status") or {}),
        }
    }


@kopf.index("apps", "v1", "deployments", labels={wire.LABEL_MANAGED_BY: render.MANAGED_BY})
def deployments_index(
    *, namespace: str | None, name: str, body: kopf.Body, **_: Any
) -> dict[Key, Any]:
    return {(namespace or "default", name): summarize_deployment(dict(body))}


@kopf.index("", "v1", "pods", labels={wire.LABEL_SERVICE: kopf.PRESENT})
def pods_index(
    *, namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Key, Any]:
    return {(namespace or "default", labels[wire.LABEL_SERVICE]): summarize_pod(dict(body))}


def _indices(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: kwargs[k] for k in ("services_index", "deployments_index", "pods_index")}


@kopf.on.event("", "v1", "pods", labels={wire.LABEL_SERVICE: kopf.PRESENT})
async def pod_changed(*, namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> None:
    Context.board.touch((namespace or "default", labels[wire.LABEL_SERVICE]), _indices(kwargs))


@kopf.on.event("apps", "v1", "deployments", labels={wire.LABEL_MANAGED_BY: render.MANAGED_BY})
async def deployment_changed(*, namespace: str | None, name: str, **kwargs: Any) -> None:
    Context.board.touch((namespace or "default", name), _indices(kwargs))


@kopf.on.event(*RESOURCE)
async def service_changed(*, namespace: str | None, name: str, **kwargs: Any) -> None:
    Context.board.touch((namespace or "default", name), _indices(kwargs))


# ---- the reconciler ---------------------------------------------------------------------


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
async def reconcile(*, body: kopf.Body, reason: str, **kwargs: Any) -> None:
    """Render the service's objects and apply them; prune the PDB when one replica remains."""
    key = (body["metadata"]["namespace"], body["metadata"]["name"])
    generation = body["metadata"].get("generation", 0)
    try:
        service = api.InferenceService.model_validate(
            {"metadata": dict(body["metadata"]), "spec": dict(body["spec"])}
        )
    except ValidationError as error:
        await _refuse(body, key, generation, f"spec rejected: {error.errors()[0]['msg']}", kwargs)
        raise kopf.PermanentError(str(error)) from error
    objects = render.render(service, Context.settings)
    objects[0]["metadata"]["annotations"] = {GENERATION_ANNOTATION: str(generation)}
    try:
        for obj in objects:
            await asyncio.to_thread(Context.client.apply, obj)
        # A new service never had a budget; an existing one may have had one for more replicas.
        if len(objects) < 3 and reason != kopf.Reason.CREATE:
            await _delete_if_present(resource_path("policy/v1", "PodDisruptionBudget", *key))
    except KubeError as error:
        if error.status in (400, 403, 422):
            message = f"{error.reason}: {error.message}"
            await _refuse(body, key, generation, message, kwargs)
            raise kopf.PermanentError(message) from error
        raise kopf.TemporaryError(f"applying objects failed: {error}", delay=5) from error
    Context.board.render_errors.pop(key, None)
    if reason != kopf.Reason.RESUME:
        kinds = ", ".join(o["kind"] for o in objects)
        verb = "Created" if reason == kopf.Reason.CREATE else "Updated"
        await asyncio.to_thread(
            record_event,
            Context.client,
            dict(body),
            "Normal",
            verb,
            f"applied {kinds} (generation {generation})",
        )
    Context.board.touch(key, _indices(kwargs))


async def _refuse(
    body: kopf.Body, key: Key, generation: int, message: str, kwargs: dict[str, Any]
) -> None:
    Context.board.render_errors[key] = (generation, message)
    await asyncio.to_thread(
        record_event, Context.client, dict(body), "Warning", "InvalidSpec", message
    )
    Context.board.touch(key, _indices(kwargs))


async def _delete_if_present(path: str) -> None:
    try:
        await asyncio.to_thread(Context.client.delete, path)
    except KubeError as error:
        if error.status != 404:
            raise
