"""``service_status(...)``: what an InferenceService's status says, from what its children show.

Pure: summaries of the Deployment and pods in, the ``status`` dict out. Spec is intent, status is
observation, so nothing here is remembered between calls except each condition's
``lastTransitionTime``, carried over from the previous status while the condition's status holds.

- ``Scheduled``: every pod is bound to a GPU; False with the scheduler's reason when one fits
  nowhere.
- ``Ready``: at least the desired number of replicas pass readiness; False with ``InvalidSpec``
  when the spec passed admission but its objects were refused (never retried for that
  generation), ``Forbidden`` or ``ApplyFailed`` while applying them fails and is retried, and
  ``RuntimeFailing`` naming a pod whose container crash-loops or cannot start, with what its last
  run said (a runtime whose GPU memory request cannot hold its weights gives the numbers).
- ``Progressing``: a rollout is under way (True) or finished (False/``RolloutComplete``), in the
  kstatus sense.
- ``ScalingActive`` (only while Berth's autoscaler runs for the service): False while its last
  decision held the replica count because metrics were missing, stale or partial (or its window
  is still filling), with that reason; True otherwise. The autoscaler writes the decision
  (``status.lastDecision``); this reads it, as an HPA's own condition of that name says.
- ``FieldsNotActedOn`` (only while there are some): True/``NotImplemented``, naming the spec
  fields that were accepted but that no controller acts on yet (``api.NOT_ACTED_ON``).
- ``HostsNotInNetworkPolicy`` (only while it holds): True/``NoFqdnPolicyEngine`` when a sandbox
  allows egress to host names and no policy engine that can name hosts is installed
  (``sandbox.hosts_note``).
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from berth import wire
from berth.operator.autoscaler import HELD

Obj = dict[str, Any]
GENERATION_ANNOTATION = f"{wire.GROUP}/generation"  # IS generation a Deployment was rendered from
INVALID_SPEC = "InvalidSpec"


@dataclass(frozen=True)
class ApplyFailure:
    """Why the API server did not take a generation's objects."""

    reason: str  # INVALID_SPEC (never applies), "Forbidden" or "ApplyFailed" (retried)
    message: str

    @property
    def permanent(self) -> bool:
        return self.reason == INVALID_SPEC


@dataclass(frozen=True)
class PodSummary:
    name: str
    bound: bool
    ready: bool
    standby: bool
    terminating: bool
    unschedulable: str | None = None  # the scheduler's message while it fits nowhere
    failing: str | None = None  # why a container of it cannot start or keeps dying


# Waiting reasons that mean a container will not start by itself (not a step of a normal start).
FAILING_WAITS = frozenset(
    {"CrashLoopBackOff", "ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull",
     "InvalidImageName", "CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
)  # fmt: skip
MAX_FAILURE_MESSAGE = 1024  # characters of a container's termination message kept in the status


def container_failure(statuses: list[Obj]) -> str | None:
    """Why a container cannot run, from the kubelet's container statuses: a failing wait
    (crash loop, image) with the message its last failed run left (``terminationMessagePolicy:
    FallbackToLogsOnError``: the runtime's own words or its last log lines); None when all is well
    or still starting."""
    for status in statuses:
        state = status.get("state") or {}
        waiting = state.get("waiting") or {}
        terminated = state.get("terminated") or (status.get("lastState") or {}).get("terminated")
        failed = terminated is not None and terminated.get("exitCode", 0) != 0
        if waiting.get("reason") not in FAILING_WAITS and not (failed and not status.get("ready")):
            continue
        if failed and terminated is not None:
            said = (terminated.get("message") or "").strip() or terminated.get("reason") or ""
            why = f"exited {terminated.get('exitCode')}: {said}".rstrip(": ")
        else:
            why = f"{waiting.get('reason')}: {waiting.get('message') or ''}".rstrip(": ")
        if len(why) > MAX_FAILURE_MESSAGE:
            why = why[:MAX_FAILURE_MESSAGE] + " ..."
        return f"container {status.get('name', '?')} {why}"
    return None


@dataclass(frozen=True)
class DeploymentSummary:
    rendered_generation: int | None  # the InferenceService generation it was applied for
    generation: int
    observed_generation: int
    replicas: int
    updated_replicas: int
    ready_replicas: int
    progress_deadline_exceeded: bool = False


@dataclass
class ServiceView:
    """Everything the status is computed from."""

    generation: int
    desired_replicas: int
    url: str
    selector: str
    deployment: DeploymentSummary | None = None
    pods: list[PodSummary] = field(default_factory=list)
    render_error: ApplyFailure | None = None  # why this generation's objects are not applied
    not_acted_on: tuple[str, ...] = ()  # spec fields accepted but not acted on yet
    autoscaled: bool = False  # Berth's autoscaler sets the replica count (autoscaling.mode berth)
    last_decision: Obj | None = None  # the autoscaler's ``status.lastDecision``, as it wrote it
    hosts_note: str | None = None  # why the sandbox's egress host names are in no policy


def summarize_pod(pod: Obj) -> PodSummary:
    meta, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
    conditions = {c["type"]: c for c in status.get("conditions") or []}
    scheduled = conditions.get("PodScheduled", {})
    unschedulable = None
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        unschedulable = scheduled.get("message") or "no GPU fits"
    annotations = meta.get("annotations") or {}
    return PodSummary(
        name=meta["name"],
        bound=bool(spec.get("nodeName")),
        ready=conditions.get("Ready", {}).get("status") == "True",
        standby=annotations.get(wire.POD_STANDBY) == "true",
        terminating=bool(meta.get("deletionTimestamp")),
        unschedulable=None if spec.get("nodeName") else unschedulable,
        failing=container_failure(
            (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])
        ),
    )


def summarize_deployment(deployment: Obj) -> DeploymentSummary:
    meta, status = deployment["metadata"], deployment.get("status", {})
    rendered = (meta.get("annotations") or {}).get(GENERATION_ANNOTATION)
    conditions = {c["type"]: c for c in status.get("conditions") or []}
    return DeploymentSummary(
        rendered_generation=int(rendered) if rendered else None,
        generation=meta.get("generation", 0),
        observed_generation=status.get("observedGeneration", 0),
        replicas=status.get("replicas", 0),
        updated_replicas=status.get("updatedReplicas", 0),
        ready_replicas=status.get("readyReplicas", 0),
        progress_deadline_exceeded=conditions.get("Progressing", {}).get("reason")
        == "ProgressDeadlineExceeded",
    )


def condition(obj: Mapping[str, Any], kind: str) -> Obj:
    """The ``status.conditions`` entry of type ``kind`` of any object (a Node, a Pod, an
    InferenceService), or ``{}``."""
    for entry in (obj.get("status") or {}).get("conditions") or []:
        if entry.get("type") == kind:
            return dict(entry)
    return {}


def _condition(kind: str, ok: bool, reason: str, message: str, generation: int) -> Obj:
    return {
        "type": kind,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    }


def _scheduled(view: ServiceView, live: list[PodSummary], generation: int) -> Obj:
    stuck = [p for p in live if p.unschedulable]
    if stuck:
        # The reason keeps its name (clients match on it); the message says what was short:
        # a GPU's memory, or the node's CPU, memory or pod slots (placement.py).
        message = f"{len(stuck)} pod(s) could not be placed: {stuck[0].unschedulable}"
        return _condition("Scheduled", False, "NoGpuFits", message, generation)
    waiting = [p for p in live if not p.bound]
    if waiting:
        message = f"{len(waiting)} pod(s) waiting for the GPU scheduler"
        return _condition("Scheduled", False, "Pending", message, generation)
    if not live and view.desired_replicas > 0:  # not placed yet: there is nothing to place
        message = "waiting for the Deployment's pods"
        return _condition("Scheduled", False, "Pending", message, generation)
    message = f"{len(live)} pod(s) placed on GPUs"
    return _condition("Scheduled", True, "AllPodsPlaced", message, generation)


def _progressing(view: ServiceView, generation: int) -> Obj:
    d = view.deployment
    if d is None:
        return _condition("Progressing", True, "Creating", "rendering the Deployment", generation)
    if d.progress_deadline_exceeded:
        message = "the rollout made no progress within its deadline"
        return _condition("Progressing", False, "ProgressDeadlineExceeded", message, generation)
    rolling = (
        d.rendered_generation != view.generation
        or d.observed_generation < d.generation
        or d.updated_replicas < view.desired_replicas
        or d.replicas > d.updated_replicas
    )
    if rolling:
        message = f"{d.updated_replicas}/{view.desired_replicas} replicas updated"
        return _condition("Progressing", True, "RollingOut", message, generation)
    return _condition(
        "Progressing", False, "RolloutComplete", "all replicas run the current spec", generation
    )


def service_status(view: ServiceView, previous: Obj | None, now: str) -> Obj:
    """The status subresource for one InferenceService."""
    generation = view.generation
    live = [p for p in view.pods if not p.terminating]
    ready = sum(p.ready for p in live)
    standby = sum(p.standby for p in live)
    scheduled = _scheduled(view, live, generation)
    failure = view.render_error
    if failure:
        ready_condition = _condition("Ready", False, failure.reason, failure.message, generation)
        if failure.permanent:
            message = "nothing to schedule"
            scheduled = _condition("Scheduled", False, INVALID_SPEC, message, generation)
    elif view.desired_replicas == 0:
        ready_condition = _condition(
            "Ready", False, "ScaledToZero", "no replicas requested", generation
        )
    elif ready >= view.desired_replicas:
        message = f"{ready}/{view.desired_replicas} replicas ready"
        ready_condition = _condition("Ready", True, "ReplicasReady", message, generation)
    elif scheduled["reason"] == "NoGpuFits":
        ready_condition = _condition(
            "Ready", False, "Unschedulable", scheduled["message"], generation
        )
    elif failing := [p for p in live if p.failing]:
        message = f"{ready}/{view.desired_replicas} replicas ready; pod {failing[0].name}: "
        ready_condition = _condition(
            "Ready", False, "RuntimeFailing", message + str(failing[0].failing), generation
        )
    else:
        message = f"{ready}/{view.desired_replicas} replicas ready"
        ready_condition = _condition("Ready", False, "ReplicasNotReady", message, generation)
    conditions = [ready_condition, scheduled, _progressing(view, generation)]
    decision = view.last_decision
    if view.autoscaled and decision:
        reason = decision.get("reason") or "Unknown"
        message = decision.get("message") or reason
        conditions.append(
            _condition("ScalingActive", reason not in HELD, reason, message, generation)
        )
    if view.not_acted_on:
        message = f"accepted but not acted on yet: {', '.join(view.not_acted_on)}"
        conditions.append(
            {**_condition("FieldsNotActedOn", True, "NotImplemented", message, generation)}
        )
    if view.hosts_note:
        conditions.append(
            _condition(
                "HostsNotInNetworkPolicy", True, "NoFqdnPolicyEngine", view.hosts_note, generation
            )
        )
    before = {c["type"]: c for c in (previous or {}).get("conditions") or []}
    for condition in conditions:
        old = before.get(condition["type"])
        held = old is not None and old.get("status") == condition["status"]
        condition["lastTransitionTime"] = old["lastTransitionTime"] if held and old else now
    observed = view.deployment.rendered_generation if view.deployment else None
    status: Obj = {
        "observedGeneration": generation if failure and failure.permanent else observed,
        "conditions": conditions,
        "replicas": len(live),
        "readyReplicas": ready,
        "standbyReplicas": standby,
        "selector": view.selector,
    }
    # The endpoint is published once a replica can answer, so a client that waits for the URL
    # never meets a Service without endpoints; it goes again when no replica is ready.
    status["url"] = view.url if ready else None
    return status
