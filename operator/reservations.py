"""GPU reservation pods: every GPU that holds Berth tenants is also held by one ordinary pod.

Berth's tenants request no ``nvidia.com/gpu`` (a fraction is not an integer device), so without
help kube-scheduler, the kubelet's device manager and ResourceQuotas would all see a Berth GPU as
free. NVIDIA's KAI-Scheduler solves this with a reservation pod per shared GPU, and so does
Berth: a pod in the reservation namespace (``berth-system``) with ``nodeName`` preset (no
scheduler involved), requesting ``nvidia.com/gpu: 1``, running a pause image at the highest
priority and tolerating every taint. It is created before the first tenant is bound to its GPU
and deleted once the GPU has no tenants left. Its state lives only in the API server: the pods
carry the node (``spec.nodeName``) and the device index (an annotation), and are listed again at
start-up.

Limits of the pause image: the device plugin, not Berth, chooses which physical device the
reservation gets, so the *count* of free GPUs is right for every other scheduler and quota, while
the device a default-scheduler pod receives is the device plugin's choice. A reservation image
that reads its own device UUID (as KAI's does) and annotates the pod would close that gap.
"""

import logging
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

from berth import wire
from berth.operator.kube import KubeClient, KubeError, Obj, resource_path
from berth.operator.ledger import RESERVATION, GpuKey

log = logging.getLogger(__name__)
REPAIR_INTERVAL_S = 15.0  # a GPU whose reservation keeps failing is tried again this often
LABEL_RESERVATION = f"{wire.GROUP}/gpu-reservation"  # "true" on every reservation pod
ANNOTATION_GPU_INDEX = f"{wire.GROUP}/reserved-gpu-index"  # the device index it stands for


def reservation_manifest(
    gpu: GpuKey, namespace: str, image: str, priority_class: str
) -> dict[str, Any]:
    """The reservation pod of one GPU (pure); it takes ``RESERVATION`` of its node, which
    placement plans for."""
    node, index = gpu
    cpu, memory = f"{RESERVATION.cpu}m", f"{RESERVATION.memory >> 20}Mi"
    spec: dict[str, Any] = {
        "nodeName": node,
        "containers": [
            {
                "name": "reserve",
                "image": image,
                "resources": {
                    "requests": {wire.GPU_RESOURCE: "1", "cpu": cpu, "memory": memory},
                    "limits": {wire.GPU_RESOURCE: "1", "memory": memory},
                },
            }
        ],
        "tolerations": [{"operator": "Exists"}],
        "terminationGracePeriodSeconds": 0,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
    }
    if priority_class:
        spec["priorityClassName"] = priority_class
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": f"gpu-{node[:200]}-{index}-",
            "namespace": namespace,
            "labels": {LABEL_RESERVATION: "true", wire.LABEL_MANAGED_BY: "berth"},
            "annotations": {ANNOTATION_GPU_INDEX: str(index)},
        },
        "spec": spec,
    }


def reservation_gpu(pod: Obj) -> GpuKey | None:
    """The GPU a live reservation pod holds; None when it is going away or is malformed."""
    meta = pod.get("metadata") or {}
    node = (pod.get("spec") or {}).get("nodeName")
    index = (meta.get("annotations") or {}).get(ANNOTATION_GPU_INDEX, "")
    if meta.get("deletionTimestamp") or not node or not index.isdigit():
        return None
    if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return None
    return (node, int(index))


class GpuReservations:
    """Which GPUs are held by a reservation pod, fed by a watch of the reservation namespace.

    ``hold`` is called by bind workers before a tenant is bound (one creation per GPU at a time);
    ``release`` and ``missing`` are called by the scheduler with its lock held, so that a GPU is
    released only while the ledger says it has no tenants: a tenant booked after that finds the
    GPU not held and creates a fresh reservation.
    """

    def __init__(self, client: KubeClient, namespace: str, image: str, priority_class: str) -> None:
        self.client, self.namespace = client, namespace
        self.image, self.priority_class = image, priority_class
        self.lock = threading.Lock()
        self.held: dict[GpuKey, str] = {}  # GPU -> name of its live reservation pod
        self.doomed: set[str] = set()  # second reservations of a held GPU, failed ones: to delete
        self.released: set[str] = set()  # deleted by us: late events about them are ignored
        self.gates: dict[GpuKey, threading.Lock] = {}
        self.repaired_at: dict[GpuKey, float] = {}
        self.namespace_ready = False

    @property
    def path(self) -> str:
        return resource_path("v1", "Pod", self.namespace)

    # ---- watch callbacks -----------------------------------------------------------------

    def listed(self, items: list[Obj]) -> None:
        with self.lock:
            self.held, self.doomed = {}, set()
            for pod in items:
                self._observe(pod)

    def event(self, kind: str, pod: Obj) -> None:
        with self.lock:
            if kind == "DELETED":
                name = pod["metadata"]["name"]
                self.released.discard(name)
                self.doomed.discard(name)
                self.held = {g: n for g, n in self.held.items() if n != name}
                return
            self._observe(pod)

    def _observe(self, pod: Obj) -> None:
        name = pod["metadata"]["name"]
        if name in self.released:
            return
        gpu = reservation_gpu(pod)
        if gpu is None:
            self.held = {g: n for g, n in self.held.items() if n != name}
            if not pod["metadata"].get("deletionTimestamp"):
                self.doomed.add(name)  # failed (the kubelet had no device for it) or malformed
        elif self.held.setdefault(gpu, name) != name:
            self.doomed.add(name)

    # ---- decisions (scheduler lock held) -------------------------------------------------

    def release(self, in_use: Collection[GpuKey]) -> list[str]:
        """Forget the reservations of GPUs not in use, duplicates and failed ones; the pods to
        delete."""
        with self.lock:
            unused = [gpu for gpu in self.held if gpu not in in_use]
            names = [self.held.pop(gpu) for gpu in unused] + sorted(self.doomed)
            self.doomed.clear()
            self.released.update(names)
            return names

    def missing(self, in_use: Collection[GpuKey]) -> list[GpuKey]:
        """GPUs with tenants but no reservation (one deleted by someone else, say)."""
        with self.lock:
            return [gpu for gpu in in_use if gpu not in self.held]

    def sync(self, in_use: Collection[GpuKey], submit: Callable[..., object]) -> None:
        """Delete the reservations of GPUs without tenants and hold GPUs with tenants but none
        (rate-limited per GPU); ``submit`` runs the API calls off the caller's lock."""
        unused = self.release(in_use)
        if unused:
            submit(self.delete, unused)
        now = time.monotonic()
        for gpu in self.missing(in_use):
            if now - self.repaired_at.get(gpu, -1e9) >= REPAIR_INTERVAL_S:
                self.repaired_at[gpu] = now
                submit(self._hold_quietly, gpu)

    def _hold_quietly(self, gpu: GpuKey) -> None:
        try:
            self.hold(gpu)
        except Exception as error:
            log.warning("GPU %s/%d has tenants but no reservation: %s", *gpu, error)

    def count(self) -> int:
        return len(self.held)

    # ---- API writes (worker threads) -----------------------------------------------------

    def hold(self, gpu: GpuKey) -> None:
        """Make sure ``gpu`` has a reservation pod; raises KubeError when one cannot be made
        (a ResourceQuota that is full, RBAC), in which case no tenant may bind there."""
        with self.lock:
            if gpu in self.held:
                return
            gate = self.gates.setdefault(gpu, threading.Lock())
        with gate:
            with self.lock:
                if gpu in self.held:
                    return
            self._ensure_namespace()
            manifest = reservation_manifest(gpu, self.namespace, self.image, self.priority_class)
            created = self.client.create(self.path, manifest)
            name = created["metadata"]["name"]
            with self.lock:
                if self.held.setdefault(gpu, name) != name:
                    self.doomed.add(name)
            log.info("GPU %s/%d reserved by %s/%s", *gpu, self.namespace, name)

    def delete(self, names: list[str]) -> None:
        for name in names:
            try:
                self.client.delete(f"{self.path}/{name}", grace_period_s=0)
                log.info("reservation %s/%s deleted", self.namespace, name)
            except KubeError as error:
                if error.status != 404:
                    log.warning("reservation %s/%s not deleted: %s", self.namespace, name, error)
                    with self.lock:
                        self.released.discard(name)
                        self.doomed.add(name)  # tried again on the next pass

    def _ensure_namespace(self) -> None:
        if self.namespace_ready:
            return
        body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.namespace}}
        try:
            self.client.post(resource_path("v1", "Namespace"), body)
        except KubeError as error:
            # 409: it exists; 403: we may not create namespaces (the chart made this one):
            # either way the pod's creation says whether we may work here.
            if error.status not in (403, 409):
                raise
        self.namespace_ready = True
