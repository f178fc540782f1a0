"""The API side of one bind: check the owner, hold the GPU, POST the Binding; say what happened.

The scheduler books and frees shares; this module only talks to the API server and classifies
the answer, so that the scheduler's reaction to each outcome is one small, tested table:

| outcome | when | the scheduler |
| --- | --- | --- |
| ``BOUND`` | the Binding was accepted | keeps the share assumed until a watch confirms it |
| ``UNCERTAIN`` | timeout, 5xx, 429, broken connection; 404 (gone) or 409 (already bound) | keeps the share assumed until confirmed, removed or expired |
| ``RETRY`` | the Binding or the reservation was refused for certain, or ownership unknown | frees the share, parks the pod, retries later |
| ``NOT_OWNED`` | no InferenceService owns the pod | frees the share, never places the pod |
"""

import enum
from dataclasses import dataclass

from berth.operator.events import now_rfc3339, record_event
from berth.operator.kube import KubeClient, KubeError, Obj, resource_path
from berth.operator.ledger import Allocation
from berth.operator.ownership import OwnerCheck
from berth.operator.reservations import GpuReservations


class Outcome(enum.Enum):
    BOUND = "bound"
    UNCERTAIN = "uncertain"
    RETRY = "retry"
    NOT_OWNED = "not-owned"


@dataclass(frozen=True)
class BindResult:
    outcome: Outcome
    reason: str = ""
    metric: str = ""  # the bind_failures label, when it failed


def ambiguous(error: Exception) -> bool:
    """True when a failed Binding call may still have landed (timeouts, 5xx, 429, a broken
    connection); False when the API server refused it for certain."""
    if isinstance(error, KubeError):
        return error.status >= 500 or error.status in (408, 429)
    return True


def binding(pod: Obj, allocation: Allocation, annotations: dict[str, str]) -> Obj:
    meta = pod["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
            "annotations": annotations,
        },
        "target": {"apiVersion": "v1", "kind": "Node", "name": allocation.node},
    }


class Binder:
    def __init__(
        self,
        client: KubeClient,
        owners: OwnerCheck | None,
        reservations: GpuReservations | None,
    ) -> None:
        self.client, self.owners, self.reservations = client, owners, reservations

    def bind(self, pod: Obj, allocation: Allocation, annotations: dict[str, str]) -> BindResult:
        try:
            refusal = self.owners.refusal(pod) if self.owners is not None else None
        except Exception as error:  # the API server cannot say now
            return BindResult(Outcome.RETRY, f"cannot check who owns it: {error}", "owner")
        if refusal is not None:
            return BindResult(Outcome.NOT_OWNED, refusal)
        try:
            if self.reservations is not None:
                self.reservations.hold(allocation.gpu)
        except Exception as error:  # a full ResourceQuota, RBAC: no tenant may bind there
            gpu = f"{allocation.node} GPU {allocation.gpu_index}"
            return BindResult(Outcome.RETRY, f"cannot reserve {gpu} for it: {error}", "reservation")
        meta = pod["metadata"]
        path = resource_path("v1", "Pod", meta["namespace"], meta["name"]) + "/binding"
        try:
            self.client.post(path, binding(pod, allocation, annotations))
        except Exception as error:
            if ambiguous(error):
                return BindResult(Outcome.UNCERTAIN, str(error), "ambiguous")
            if isinstance(error, KubeError) and error.status in (404, 409):
                # gone, or already bound (an earlier bind that timed out but landed): a watch
                # event removes or confirms it
                return BindResult(Outcome.UNCERTAIN, str(error), "conflict")
            return BindResult(Outcome.RETRY, f"binding refused: {error}", "refused")
        return BindResult(Outcome.BOUND)

    def report_unschedulable(self, pod: Obj, reason: str) -> None:
        """``PodScheduled=False/Unschedulable`` and a ``FailedScheduling`` event."""
        meta = pod["metadata"]
        condition = {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": reason,
            "lastTransitionTime": now_rfc3339(),
        }
        path = resource_path("v1", "Pod", meta["namespace"], meta["name"]) + "/status"
        try:
            self.client.strategic_patch(path, {"status": {"conditions": [condition]}})
        except KubeError:
            return  # the pod is gone or the API server is busy; the next pass reports again
        record_event(self.client, pod, "Warning", "FailedScheduling", reason)
