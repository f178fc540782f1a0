"""Kubernetes Events on the objects Berth acts on (``kubectl describe`` shows them)."""

import logging
from datetime import UTC, datetime
from typing import Any

from berth.operator.kube import KubeClient, KubeError, Obj, resource_path

log = logging.getLogger(__name__)
COMPONENT = "berth"


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def record_event(client: KubeClient, involved: Obj, kind: str, reason: str, message: str) -> None:
    """Post a core/v1 Event about ``involved``; best effort: a lost event is only logged."""
    meta = involved["metadata"]
    stamp = now_rfc3339()
    event: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": involved.get("apiVersion", "v1"),
            "kind": involved.get("kind", "Pod"),
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
        },
        "type": kind,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": COMPONENT,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
    try:
        client.post(resource_path("v1", "Event", meta["namespace"]), event)
    except KubeError as error:
        log.info("event %s on %s not recorded: %s", reason, meta["name"], error)
