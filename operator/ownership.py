"""Only pods the operator rendered get a GPU share.

Anyone who may create pods can set ``schedulerName: berth`` and Berth's annotations by hand. A
share goes only to a pod whose controller chain ends at an InferenceService of the same name:
pod -> ReplicaSet -> Deployment ``<name>`` -> InferenceService ``<name>``, each link checked by
uid against the live object. The Deployment of that name is the one the reconciler applies (a
second one cannot exist), and a hand-made ReplicaSet under it is scaled to zero by the
Deployment controller, so the chain cannot be forged with objects a tenant may create.

The chain of a ReplicaSet is looked up once (two or three GETs) and cached by its uid; a refusal
is cached by the pod's uid until the pod is deleted.
"""

import logging
import threading

from berth import wire
from berth.operator.kube import KubeClient, KubeError, Obj, resource_path

log = logging.getLogger(__name__)
SERVICE_API = f"{wire.GROUP}/{wire.VERSION}"


def controller_of(obj: Obj) -> Obj | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return dict(ref)
    return None


class OwnerCheck:
    def __init__(self, client: KubeClient) -> None:
        self.client = client
        self.lock = threading.Lock()
        self.trusted: set[str] = set()  # ReplicaSet uids whose chain ends at their service
        self.refused: dict[str, str] = {}  # pod uid -> why

    def refusal(self, pod: Obj) -> str | None:
        """Why ``pod`` may not have a share, or None when an InferenceService owns it.
        Raises KubeError when the API server cannot say (the caller retries later)."""
        meta = pod["metadata"]
        uid = meta.get("uid", "")
        with self.lock:
            if uid in self.refused:
                return self.refused[uid]
        reason = self._check(pod)
        if reason is not None:
            with self.lock:
                self.refused[uid] = reason
        return reason

    def forget(self, pod: Obj) -> None:
        with self.lock:
            self.refused.pop(pod["metadata"].get("uid", ""), None)

    def _check(self, pod: Obj) -> str | None:
        meta = pod["metadata"]
        namespace = meta.get("namespace", "default")
        service = (meta.get("labels") or {}).get(wire.LABEL_SERVICE)
        if not service:
            return f"not rendered by Berth: no {wire.LABEL_SERVICE} label"
        owner = controller_of(pod)
        if owner is None or owner.get("kind") != "ReplicaSet":
            return "not rendered by Berth: not controlled by a ReplicaSet of its InferenceService"
        with self.lock:
            if owner.get("uid") in self.trusted:
                return None
        replica_set = self._get("apps/v1", "ReplicaSet", namespace, owner["name"], owner.get("uid"))
        if replica_set is None:
            return f"not rendered by Berth: ReplicaSet {owner['name']} (uid {owner.get('uid')}) not found"
        deployment_ref = controller_of(replica_set)
        if not _is(deployment_ref, "apps/v1", "Deployment", service):
            return f"not rendered by Berth: ReplicaSet {owner['name']} is not controlled by Deployment {service}"
        assert deployment_ref is not None
        deployment = self._get(
            "apps/v1", "Deployment", namespace, service, deployment_ref.get("uid")
        )
        service_ref = controller_of(deployment) if deployment else None
        if not _is(service_ref, SERVICE_API, "InferenceService", service):
            return f"not rendered by Berth: Deployment {service} is not controlled by InferenceService {service}"
        assert service_ref is not None
        if (
            self._get(SERVICE_API, "InferenceService", namespace, service, service_ref.get("uid"))
            is None
        ):
            return f"not rendered by Berth: InferenceService {service} (uid {service_ref.get('uid')}) not found"
        with self.lock:
            self.trusted.add(owner["uid"])
        return None

    def _get(self, api: str, kind: str, namespace: str, name: str, uid: str | None) -> Obj | None:
        """The live object when its uid matches; None when it is gone or another object."""
        try:
            obj = self.client.get(resource_path(api, kind, namespace, name))
        except KubeError as error:
            if error.status == 404:
                return None
            raise
        return obj if obj["metadata"].get("uid") == uid else None


def _is(ref: Obj | None, api_version: str, kind: str, name: str) -> bool:
    return (
        ref is not None
        and ref.get("apiVersion") == api_version
        and ref.get("kind") == kind
        and ref.get("name") == name
    )
