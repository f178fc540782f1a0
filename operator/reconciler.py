"""kopf handlers: InferenceService -> Deployment, Service, PodDisruptionBudget and the sandbox's
policies; owned objects kept.

``reconcile`` renders and applies a service's objects (server-side apply, field manager
``berth``, owner references, so the garbage collector cleans up on delete and a restart
re-applies identical objects: no churn). ``put_back`` watches the objects it owns, as
controller-runtime's ``Owns()`` does, and re-applies one that was deleted or edited by hand
(``drift.drifted``), rendering from kopf's in-memory index of services, so a repair costs no read.
It is a kopf event handler rather than a hook in the status board's Deployment watch because the
repair is the reconciler's own render-and-apply with its failure reporting, the index gives the
owner's spec, and the board stays the status writer only (it does not watch Services at all).
The price: kopf filters by label on the client, so every Deployment, Service and PDB event in
the watched namespaces reaches the process; a check is a parse, a render and a compare (about a
millisecond), and a no-op apply makes no event, so a repair never loops.
Status has one writer, ``StatusBoard`` (status_board.py); the handlers tell it how applying went.

Failures are named for what they are (``apply_failure``): a 422 from the API server means the
spec, though admitted, renders objects it refuses: ``InvalidSpec``, a ``PermanentError`` for that
generation. Anything else (403 from RBAC or quota, 5xx, 429, a broken connection) may pass:
``Forbidden`` or ``ApplyFailed`` in the ``Ready`` condition and a ``TemporaryError`` retried with
exponential backoff on kopf's per-object retry count (``retry_delay``).

Shared state reaches the handlers as kopf's ``memo`` (``Shared``), set once by ``kopf.run``. It
holds the policy engines the cluster has (Cilium's and Tetragon's CRDs, ``discover_engines``),
looked up once at start-up: a cluster that gains one later needs an operator restart.
"""

import asyncio
import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import kopf
from pydantic import ValidationError

from berth import wire
from berth.operator import api, api_types, drift, render, routing, sandbox
from berth.operator.events import record_event
from berth.operator.kube import KubeClient, KubeError, Obj, resource_path
from berth.operator.settings import OperatorSettings
from berth.operator.status import GENERATION_ANNOTATION, INVALID_SPEC, ApplyFailure
from berth.operator.status_board import Key, StatusBoard

log = logging.getLogger(__name__)
RESOURCE = (wire.GROUP, wire.VERSION, api.PLURAL)
OWNED_LABELS: dict[str, Any] = {
    wire.LABEL_MANAGED_BY: render.MANAGED_BY,
    wire.LABEL_SERVICE: kopf.PRESENT,
}
RETRY_BASE_S = 1.0  # first retry of a failed apply; doubles per retry
RETRY_CAP_S = 300.0
UNEXPECTED_BACKOFF_S = 30.0  # kopf's retry delay for an exception no handler names (a bug)


@dataclass(frozen=True)
class Shared:
    """What every handler needs; kopf passes it as ``memo`` (a shallow copy per object)."""

    settings: OperatorSettings
    client: KubeClient
    board: StatusBoard
    engines: sandbox.PolicyEngines = sandbox.NO_ENGINES


def shared(settings: OperatorSettings, client: KubeClient) -> Shared:
    """The memo for ``kopf.run``."""
    engines = discover_engines(client)
    return Shared(settings, client, StatusBoard(client, settings.namespaces, engines), engines)


def discover_engines(client: KubeClient) -> sandbox.PolicyEngines:
    """Which policy engines the cluster has, by their CRDs. A 403 counts as absent (a chart
    older than this operator), with a warning; other failures stop the start-up."""

    def installed(name: str) -> bool:
        path = resource_path("apiextensions.k8s.io/v1", "CustomResourceDefinition", name=name)
        try:
            client.get(path)
        except KubeError as error:
            if error.status == 403:
                log.warning("may not read CRD %s (%s): its policies are not rendered", name, error)
            elif error.status != 404:
                raise
            return False
        return True

    engines = sandbox.PolicyEngines(
        cilium=installed(sandbox.CILIUM_CRD), tetragon=installed(sandbox.TETRAGON_CRD)
    )
    log.info("policy engines: cilium=%s tetragon=%s", engines.cilium, engines.tetragon)
    return engines


def retry_delay(retry: int) -> float:
    """Seconds before retry number ``retry + 1``: 1, 2, 4, ... capped at ``RETRY_CAP_S``."""
    return min(RETRY_CAP_S, RETRY_BASE_S * 2.0 ** min(retry, 32))


def apply_failure(obj: Obj, error: Exception) -> ApplyFailure:
    """Name a failed write of ``obj``: only a 422 says the spec itself can never apply."""
    what = f"{obj['kind']} {obj['metadata']['name']}"
    if isinstance(error, KubeError):
        detail = f"{error.status} {error.reason}: {error.message}"
        if error.status == 422:
            return ApplyFailure(INVALID_SPEC, f"the API server refused {what}: {detail}")
        reason = "Forbidden" if error.status == 403 else "ApplyFailed"
    else:
        detail, reason = f"{type(error).__name__}: {error}", "ApplyFailed"
    return ApplyFailure(reason, f"applying {what} failed, retrying with backoff: {detail}")


class ApplyError(Exception):
    def __init__(self, failure: ApplyFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


# ---- process-wide handlers ----------------------------------------------------------------


@kopf.on.startup()
async def tune_kopf(settings: kopf.OperatorSettings, memo: Shared, **_: Any) -> None:
    """Keep kopf's bookkeeping in annotations, so the status subresource is ours alone; give
    blocking API calls (``asyncio.to_thread``) enough threads for thousands of services."""
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(memo.settings.api_threads, thread_name_prefix="api")
    )
    prefix = f"kopf.{wire.GROUP}"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=prefix, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 120
    settings.networking.request_timeout = 60
    memo.board.start()


@kopf.on.cleanup()
async def stop_status_board(memo: Shared, **_: Any) -> None:
    memo.board.shutdown()


@kopf.on.login()
def login(memo: Shared, **_: Any) -> kopf.ConnectionInfo:
    """kopf connects with the same credentials as the rest of the process."""
    client = memo.client
    return kopf.ConnectionInfo(
        server=client.server,
        ca_path=client.verify if isinstance(client.verify, str) else None,
        insecure=client.verify is False,
        token=client.token,
        scheme="Bearer" if client.token else None,
        certificate_path=client.cert[0] if client.cert else None,
        private_key_path=client.cert[1] if client.cert else None,
    )


# ---- the reconciler -----------------------------------------------------------------------


@kopf.index(*RESOURCE)
def services_by_key(body: kopf.Body, **_: Any) -> dict[Key, Obj]:
    """Every service's metadata and spec by (namespace, name), for ``put_back``."""
    meta = body["metadata"]
    keep = ("name", "namespace", "uid", "generation", "deletionTimestamp")
    return {
        (meta["namespace"], meta["name"]): {
            "metadata": {k: meta[k] for k in keep if k in meta},
            "spec": dict(body.get("spec") or {}),
        }
    }


@kopf.on.resume(*RESOURCE, backoff=UNEXPECTED_BACKOFF_S)
@kopf.on.create(*RESOURCE, backoff=UNEXPECTED_BACKOFF_S)
@kopf.on.update(*RESOURCE, field="spec", backoff=UNEXPECTED_BACKOFF_S)
async def reconcile(
    *,
    body: kopf.Body,
    reason: str,
    retry: int,
    memo: Shared,
    old: Any = None,
    new: Any = None,
    **_: Any,
) -> None:
    """Render the service's objects and apply them; prune the PDB when one replica remains, and
    the sandbox's policies when they are no longer rendered."""
    key = (body["metadata"]["namespace"], body["metadata"]["name"])
    generation = body["metadata"].get("generation", 0)
    try:
        service = _parse(body)
    except ValidationError as error:
        failure = ApplyFailure(INVALID_SPEC, f"spec rejected: {api_types.field_errors(error)}")
        await _report(memo, body, key, generation, failure)
        raise kopf.PermanentError(failure.message) from error
    try:
        # A new service never had a budget; an existing one may have had one for more replicas,
        # and policies of a sandbox it no longer has (looked for on resume and sandbox changes).
        sandbox_changed = reason == kopf.Reason.RESUME or (
            reason == kopf.Reason.UPDATE
            and (old or {}).get("sandbox") != (new or {}).get("sandbox")
        )
        prune = _prunable(memo, sandbox_changed) if reason != kopf.Reason.CREATE else []
        objects = await _apply(memo, service, generation, prune)
    except ApplyError as error:
        await _report(memo, body, key, generation, error.failure)
        if error.failure.permanent:
            raise kopf.PermanentError(error.failure.message) from error
        delay = retry_delay(retry)
        raise kopf.TemporaryError(f"{error.failure.message} (in {delay:.0f}s)", delay) from error
    memo.board.render_error(key, generation, None)
    if reason == kopf.Reason.RESUME:
        return
    kinds = ", ".join(o["kind"] for o in objects)
    verb = "Created" if reason == kopf.Reason.CREATE else "Updated"
    await _event(memo, body, "Normal", verb, f"applied {kinds} (generation {generation})")
    ignored = api.fields_not_acted_on(service.spec)
    if ignored:
        message = f"accepted but not acted on yet: {', '.join(ignored)}"
        await _event(memo, body, "Warning", "FieldsNotActedOn", message)


@kopf.on.event("apps/v1", "deployments", labels=OWNED_LABELS)
@kopf.on.event("v1", "services", labels=OWNED_LABELS)
@kopf.on.event("policy/v1", "poddisruptionbudgets", labels=OWNED_LABELS)
@kopf.on.event("networking.k8s.io/v1", "networkpolicies", labels=OWNED_LABELS)
async def put_back(*, event: kopf.RawEvent, body: kopf.Body, memo: Shared, **kwargs: Any) -> None:
    """Re-apply an owned object that was deleted or edited away from its rendering.

    kopf never retries an event handler, and a deleted object sends no further events, so a
    failed repair is retried here with the reconciler's backoff for as long as the owner stays
    as it was: once it changes (a new generation, a deletion), ``reconcile`` owns the outcome.
    """
    meta = body["metadata"]
    key = (meta["namespace"], meta["labels"][wire.LABEL_SERVICE])
    index: kopf.Index[Key, Obj] = kwargs["services_by_key"]  # kopf passes indices by name
    owner = _owner(index, key, meta)
    if owner is None:
        return
    try:
        service = _parse(owner)
    except ValidationError:
        return  # reconcile reports it
    generation = owner["metadata"].get("generation", 0)
    wanted = next(
        (o for o in _render(service, generation, memo) if o["kind"] == body["kind"]), None
    )
    live = None if event["type"] == "DELETED" else dict(body)
    if wanted is None or not drift.drifted(wanted, live):
        return  # a budget for one replica is reconcile's to prune
    how = "deleted" if live is None else "changed"
    log.info("%s %s/%s was %s: putting it back", body["kind"], *key, how)
    attempt = 0
    while True:
        try:
            await asyncio.to_thread(memo.client.apply, wanted)
            break
        except (KubeError, httpx.HTTPError) as error:
            failure = apply_failure(wanted, error)
            memo.board.render_error(key, generation, failure)
            log.warning("%s not put back: %s", body["kind"], failure.message)
            if failure.permanent:
                return
        await asyncio.sleep(retry_delay(attempt))
        attempt += 1
        current = _owner(index, key, meta)
        if current is None or current["metadata"].get("generation", 0) != generation:
            return
    if attempt:
        memo.board.render_error(key, generation, None)
    involved = {"apiVersion": f"{wire.GROUP}/{wire.VERSION}", "kind": api.KIND, **owner}
    message = f"{body['kind']} {meta['name']} was {how}; put back as rendered"
    await _event(memo, involved, "Normal", "Restored", message)


def _owner(index: kopf.Index[Key, Obj], key: Key, meta: Any) -> Obj | None:
    """The live service that owns an object, or None when it is going or is another one."""
    owner = next(iter(index.get(key, [])), None)
    if owner is None or owner["metadata"].get("deletionTimestamp"):
        return None  # the service is going: the garbage collector takes its objects
    owners = {ref.get("uid") for ref in meta.get("ownerReferences") or []}
    if owner["metadata"].get("uid") not in owners:
        return None  # left over from an earlier service of the same name
    return owner


# ---- helpers ------------------------------------------------------------------------------


def _parse(body: kopf.Body | Obj) -> api.InferenceService:
    return api.InferenceService.model_validate(
        {"metadata": dict(body["metadata"]), "spec": dict(body["spec"])}
    )


def _render(service: api.InferenceService, generation: int, memo: Shared) -> list[Obj]:
    objects = render.render(service, memo.settings, memo.engines)
    objects[0]["metadata"]["annotations"] = {GENERATION_ANNOTATION: str(generation)}
    return objects


Kind = tuple[str, str]  # (apiVersion, kind)


def _prunable(memo: Shared, sandbox_changed: bool) -> list[Kind]:
    """The kinds a service may have had and may no longer render, all named as the service."""
    kinds = [("policy/v1", "PodDisruptionBudget")]
    if sandbox_changed:
        kinds += sandbox.policy_kinds(memo.engines)
    return kinds


async def _apply(
    memo: Shared, service: api.InferenceService, generation: int, prune: list[Kind]
) -> list[Obj]:
    objects = _render(service, generation, memo)
    if render.standby_enabled(service):
        await _ensure_admin_secret(memo, service)
    await _route_unlabelled_pods(memo, service)
    for obj in objects:
        try:
            await asyncio.to_thread(memo.client.apply, obj)
        except (KubeError, httpx.HTTPError) as error:
            raise ApplyError(apply_failure(obj, error)) from error
    rendered = {(o["apiVersion"], o["kind"]) for o in objects}
    for api_version, kind in prune:
        if (api_version, kind) in rendered:
            continue
        namespace, name = _key(service)
        gone = {"apiVersion": api_version, "kind": kind, "metadata": {"name": name}}
        try:
            await asyncio.to_thread(
                memo.client.delete, resource_path(api_version, kind, namespace, name)
            )
        except KubeError as error:
            if error.status != 404:
                raise ApplyError(apply_failure(gone, error)) from error
        except httpx.HTTPError as error:
            raise ApplyError(apply_failure(gone, error)) from error
    return objects


async def _ensure_admin_secret(memo: Shared, service: api.InferenceService) -> None:
    """Create the runtimes' admin Secret once; an existing one keeps its token."""
    secret = render.admin_secret(service, secrets.token_urlsafe(32))
    path = resource_path("v1", "Secret", _key(service)[0])
    try:
        await asyncio.to_thread(memo.client.create, path, secret)
    except KubeError as error:
        if error.status != 409:
            raise ApplyError(apply_failure(secret, error)) from error
    except httpx.HTTPError as error:
        raise ApplyError(apply_failure(secret, error)) from error


async def route_pods(client: KubeClient, namespace: str, selector: str) -> None:
    """Put the pods that ``selector`` matches into their Service's rotation (the routing
    label on, the autoscaler's annotations off); a pod gone meanwhile is skipped."""
    listing = await asyncio.to_thread(
        client.get, resource_path("v1", "Pod", namespace), labelSelector=selector
    )
    for pod in listing.get("items") or []:
        path = resource_path("v1", "Pod", namespace, pod["metadata"]["name"])
        try:
            await asyncio.to_thread(client.merge_patch, path, routing.pod_patch(True, 0))
        except KubeError as error:
            if error.status != 404:
                raise


async def _route_unlabelled_pods(memo: Shared, service: api.InferenceService) -> None:
    """Label pods that predate the routing label as routed before the Service selects on it,
    so that an operator upgrade does not empty the Service until the pods roll."""
    namespace, name = _key(service)
    selector = f"{wire.LABEL_SERVICE}={name},!{wire.LABEL_ROUTED}"
    try:
        await route_pods(memo.client, namespace, selector)
    except (KubeError, httpx.HTTPError) as error:
        pods = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{name}'s pods"}}
        raise ApplyError(apply_failure(pods, error)) from error


def _key(service: api.InferenceService) -> Key:
    return service.metadata.get("namespace", "default"), service.metadata["name"]


async def _report(
    memo: Shared, body: kopf.Body, key: Key, generation: int, failure: ApplyFailure
) -> None:
    memo.board.render_error(key, generation, failure)
    await _event(memo, body, "Warning", failure.reason, failure.message)


async def _event(memo: Shared, involved: Any, kind: str, reason: str, message: str) -> None:
    await asyncio.to_thread(record_event, memo.client, dict(involved), kind, reason, message)
