"""kopf handlers: InferenceService -> Deployment, Service, PodDisruptionBudget, and its status.

One handler renders and applies (server-side apply, field manager ``berth``, owner references,
so the garbage collector cleans up on delete and a restart re-applies identical objects: no
churn). kopf watches InferenceServices only; their status has one writer, ``StatusBoard``
(status_board.py), which watches the services' Deployments and pods itself.

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
from berth.operator.events import record_event
from berth.operator.kube import KubeClient, KubeError, resource_path
from berth.operator.settings import OperatorSettings
from berth.operator.status import GENERATION_ANNOTATION
from berth.operator.status_board import Key, StatusBoard

log = logging.getLogger(__name__)
RESOURCE = (wire.GROUP, wire.VERSION, api.PLURAL)


class Context:
    """Process-wide state the handlers share, set once by ``configure``."""

    settings: OperatorSettings
    client: KubeClient
    board: StatusBoard


def configure(settings: OperatorSettings, client: KubeClient) -> None:
    board = StatusBoard(client, settings.namespaces)
    Context.settings, Context.client, Context.board = settings, client, board


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
    Context.board.start()


@kopf.on.cleanup()
async def stop_status_board(**_: Any) -> None:
    Context.board.shutdown()


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
        await _refuse(body, key, generation, f"spec rejected: {error.errors()[0]['msg']}")
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
            await _refuse(body, key, generation, message)
            raise kopf.PermanentError(message) from error
        raise kopf.TemporaryError(f"applying objects failed: {error}", delay=5) from error
    Context.board.render_error(key, generation, None)
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


async def _refuse(body: kopf.Body, key: Key, generation: int, message: str) -> None:
    Context.board.render_error(key, generation, message)
    await asyncio.to_thread(
        record_event, Context.client, dict(body), "Warning", "InvalidSpec", message
    )


async def _delete_if_present(path: str) -> None:
    try:
        await asyncio.to_thread(Context.client.delete, path)
    except KubeError as error:
        if error.status != 404:
            raise
