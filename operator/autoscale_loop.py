"""The autoscaler's shell: one kopf daemon per InferenceService with ``autoscaling.mode: berth``.

Every ``TICK_S`` (KPA's tick) it lists the service's ready pods, reads their concurrency
(``concurrency.py``), asks the pure ``autoscaler.desired`` for a count and sets it through the
service's own ``scale`` subresource, the door an HPA or KEDA uses in ``mode: external``: the
reconciler then renders the Deployment with that many replicas, so the Deployment has one writer
and a manual ``kubectl scale`` of it is put back as for any other drift.

Status: the loop writes only its own fields (``desiredReplicas``, ``activeReplicas``,
``lastScaleTime``, ``lastDecision``) with a merge patch, beside the status board's, and posts
an event (``ScaledUp``, ``MetricsStale``, ...) whenever the count, the active count or the
reason changes; a reason that holds the count on missing metrics is a Warning.

Each tick lists the service's pods from the API server's watch cache (``resourceVersion=0``),
one cheap request per service every 2 s; a shared pod informer would save even that, at the
price of a second copy of the status board's pod cache.

The autoscaler's state (samples, panic, delay window) lives in the daemon: a restarted operator
starts over with an empty window, in which the decision never scales down (``WindowFilling``).
The decision's active/standby split is made real by routing (``routing.py``): before any scale
the loop moves the ``berth.dev/routed`` label that the Service selects on, asks runtimes out of
the rotation to park (and, when the decision wants none active, the idle one kept in it), and
parked ones that the decision wants active to wake (their admin endpoints, with the token of
the service's admin Secret), and routes every pod again when the service leaves ``mode: berth``.
"""

import asyncio
import base64
import logging
import time
from collections import deque
from dataclasses import replace
from typing import Any

import httpx
import kopf
from pydantic import ValidationError

from berth import wire
from berth.operator import api, autoscaler, render, routing
from berth.operator.autoscaler import Decision, Policy, Sample, State
from berth.operator.concurrency import (
    MetricsUnavailable,
    PodScraper,
    PodTarget,
    PrometheusSource,
    ReplicaReading,
    sample,
    service_selector,
)
from berth.operator.events import now_rfc3339, record_event
from berth.operator.kube import KubeClient, KubeError, Obj, resource_path
from berth.operator.reconciler import RESOURCE, Shared, route_pods
from berth.operator.status import condition

log = logging.getLogger(__name__)
TICK_S = 2.0
DRAIN_S = 2 * TICK_S  # out of the rotation this long before a park (kube-proxy catches up)
ADMIN_TIMEOUT_S = 1.0
ADMIN_RETRY_S = 10.0  # a park or wake not yet seen in the metrics is asked again after this
API_VERSION = f"{wire.GROUP}/{wire.VERSION}"


def berth_mode(spec: kopf.Spec, **_: Any) -> bool:
    """The daemon runs while the spec asks Berth to scale (kopf stops it when this turns False)."""
    autoscaling = spec.get("autoscaling")
    return autoscaling is not None and autoscaling.get("mode", "berth") == "berth"


def ready_pods(pods: list[Obj]) -> list[PodTarget]:
    """Ready runtime pods (not terminating, with an IP), where their container port named
    ``http`` (the rendered runtime's) answers, and whether the Service routes to them."""
    out = []
    for pod in pods:
        status, meta = pod.get("status") or {}, pod["metadata"]
        ready = condition(pod, "Ready").get("status") == "True"
        if ready and status.get("podIP") and not meta.get("deletionTimestamp"):
            ports = [
                p.get("containerPort")
                for c in (pod.get("spec") or {}).get("containers") or []
                for p in c.get("ports") or []
                if p.get("name") == "http"
            ]
            base = f"http://{status['podIP']}:{ports[0] if ports else render.PORT}"
            routed = (meta.get("labels") or {}).get(wire.LABEL_ROUTED) == "true"
            since = (meta.get("annotations") or {}).get(wire.POD_UNROUTED_AT)
            out.append(PodTarget(meta["name"], base, routed, _seconds(since)))
    return out


def _seconds(value: str | None) -> float | None:
    try:
        return None if value is None else float(value)
    except ValueError:
        return None


def replicas_of(
    targets: list[PodTarget], readings: dict[str, ReplicaReading]
) -> list[routing.Replica]:
    """The routing view of the ready pods; one whose metrics were not read is never parked."""
    out = []
    for t in targets:
        read = readings.get(t.name)
        in_flight, parked = (read.in_flight, read.parked) if read else (0.0, False)
        out.append(
            routing.Replica(t.name, t.routed, parked, in_flight, read is not None, t.unrouted_since)
        )
    return out


def status_patch(decision: Decision, now: str, scaled: bool) -> Obj:
    """The loop's own status fields for a decision (merge patch; other fields untouched)."""
    status: Obj = {
        "desiredReplicas": decision.replicas,
        "activeReplicas": decision.active,
        "lastDecision": {"reason": decision.reason, "message": decision.message, "time": now},
    }
    if scaled:
        status["lastScaleTime"] = now
    return {"status": status}


class ServiceAutoscaler:
    """One service's samples, autoscaler state and last reported decision."""

    def __init__(self, client: KubeClient, http: httpx.AsyncClient, involved: Obj) -> None:
        self.client, self.http, self.involved = client, http, involved
        meta = involved["metadata"]
        self.namespace, self.name = meta["namespace"], meta["name"]
        self.samples: deque[Sample] = deque()
        self.state: State | None = None
        self.asked: tuple[int, int] | None = None  # (spec's count, count set) until it shows
        self.reported: tuple[int, int, str] | None = None
        self.token: str | None = None  # the runtimes' admin token, read from their Secret
        self.called: dict[tuple[str, str], float] = {}  # (pod, action) -> when last asked

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    async def tick(self, spec: api.InferenceServiceSpec, now: float) -> Decision:
        policy = Policy.from_spec(spec, stale_after_s=max(10.0, 5 * TICK_S))
        shown = current = spec.desired_replicas()
        if self.asked is not None:
            if shown == self.asked[0]:
                current = self.asked[1]  # our scale has not come back through the watch yet
            else:
                self.asked = None
        if self.state is None:
            self.state = State(current)
        elif self.state.replicas != current:  # someone else set spec.replicas: it is in force
            self.state = replace(self.state, replicas=current, active=None)
        reading, targets, replicas = await self._read(spec, now)
        if reading is not None:
            self.samples.append(reading)
        while self.samples and self.samples[0].time <= now - policy.stable_window_s:
            self.samples.popleft()
        decision = autoscaler.desired(list(self.samples), policy, self.state, now)
        self.state = decision.state
        # Route first: a scale-down then removes pods already out of the rotation.
        change = routing.plan(replicas, decision.active, standby=policy.standby,
                              hold=decision.held, now=now, drain_s=DRAIN_S)  # fmt: skip
        await self._route(change, {t.name: t for t in targets}, now, tell=policy.standby)
        scaled = decision.replicas != current
        if scaled:
            await self._scale(decision.replicas)
            self.asked = (shown, decision.replicas)
        await self._report(decision, scaled)
        return decision

    async def _pods(self) -> list[Obj]:
        """The service's pods, from the API server's watch cache (not a read from etcd)."""
        path = resource_path("v1", "Pod", self.namespace)
        selector = f"{wire.LABEL_SERVICE}={self.name}"
        listing = await asyncio.to_thread(
            self.client.get, path, labelSelector=selector, resourceVersion="0"
        )
        items: list[Obj] = listing.get("items") or []
        return items

    async def _read(
        self, spec: api.InferenceServiceSpec, now: float
    ) -> tuple[Sample | None, list[PodTarget], list[routing.Replica]]:
        """This tick's sample (None when the source as a whole could not be read), the ready
        pods, and their routing view."""
        try:
            targets = ready_pods(await self._pods())
        except (KubeError, httpx.HTTPError) as error:
            log.warning("autoscaler %s/%s: listing pods failed: %s", *self.key, error)
            return None, [], []
        assert spec.autoscaling is not None
        readings: dict[str, ReplicaReading]
        if spec.autoscaling.metrics == "Prometheus" and spec.autoscaling.prometheus_url:
            matchers = service_selector(
                spec.autoscaling.prometheus_selector, self.namespace, self.name
            )
            source = PrometheusSource(self.http, spec.autoscaling.prometheus_url)
            try:
                readings = await source.read(matchers) if targets else {}
            except MetricsUnavailable as error:
                log.warning("autoscaler %s/%s: %s", *self.key, error)
                return None, targets, replicas_of(targets, {})
        else:
            readings = await PodScraper(self.http).read(targets, now)
        taken = sample([t.name for t in targets], readings, now)
        return taken, targets, replicas_of(targets, readings)

    async def _route(
        self, change: routing.Plan, targets: dict[str, PodTarget], now: float, tell: bool
    ) -> None:
        """Move the routing label, then ask the runtimes to park and wake and (``tell``: with
        standby on, their admin endpoints are open) tell them that they moved."""
        for name in sorted(change.route | change.unroute):
            body = routing.pod_patch(name in change.route, now)
            path = resource_path("v1", "Pod", self.namespace, name)
            try:
                await asyncio.to_thread(self.client.merge_patch, path, body)
            except KubeError as error:
                if error.status != 404:  # a pod that just went is not worth a warning
                    raise
        if change.route or change.unroute:
            log.info("autoscaler %s/%s: routed %s, unrouted %s", *self.key,
                     sorted(change.route) or "none", sorted(change.unroute) or "none")  # fmt: skip
        wanted = [(n, "park") for n in sorted(change.park)] + [(n, "wake") for n in change.wake]
        calls = [c for c in wanted if self.called.get(c, -ADMIN_RETRY_S) + ADMIN_RETRY_S <= now]
        self.called = {c: self.called.get(c, now) for c in wanted}  # forget the rest
        self.called.update(dict.fromkeys(calls, now))
        # Tell the moved pods too: the kubelet shows them the label only on its next sync.
        moved = sorted(change.route | change.unroute) if tell else []
        told = [(n, n in change.route) for n in moved if n in targets]
        if (calls or told) and await self._admin_token() is not None:
            await asyncio.gather(
                *(self._admin(targets[n], action) for n, action in calls),
                *(self._admin(targets[n], "rotation", {"routed": r}) for n, r in told),
            )

    async def _admin_token(self) -> str | None:
        if self.token is None:
            name = render.admin_secret_name(self.name)
            path = resource_path("v1", "Secret", self.namespace, name)
            try:
                secret = await asyncio.to_thread(self.client.get, path)
                raw = (secret.get("data") or {})[render.ADMIN_TOKEN_KEY]
                self.token = base64.b64decode(raw).decode()
            except (KubeError, httpx.HTTPError, KeyError, ValueError) as error:
                log.warning("autoscaler %s/%s: no admin token from Secret %s: %s; parked "
                            "replicas wake on requests, idle ones park on their own timeout",
                            *self.key, name, error)  # fmt: skip
        return self.token

    async def _admin(self, pod: PodTarget, action: str, body: Obj | None = None) -> None:
        """``POST /admin/park``, ``/admin/wake`` or ``/admin/rotation``; the runtime acts on it
        at once and answers when done, which need not be waited for: the next tick's metrics
        show the state, and a lost rotation call is made good by the pod's labels file."""
        headers = {"Authorization": f"Bearer {self.token}"}
        try:
            answer = await self.http.post(
                f"{pod.base}/admin/{action}", headers=headers, json=body, timeout=ADMIN_TIMEOUT_S
            )
        except httpx.TimeoutException:
            return
        except httpx.HTTPError as error:
            log.info("autoscaler %s/%s: %s %s: %s", *self.key, action, pod.name, error)
            return
        if answer.status_code in (401, 403):
            self.token = None  # rotated: read it again
        if answer.is_error:
            log.warning("autoscaler %s/%s: %s %s: HTTP %d %s", *self.key, action, pod.name,
                        answer.status_code, answer.text[:200])  # fmt: skip

    async def put_all_back(self) -> None:
        """Route every pod again: the service left Berth's autoscaling, so nothing moves the
        label any more and a Service must reach all its replicas (parked ones wake on a
        request)."""
        selector = f"{wire.LABEL_SERVICE}={self.name},{wire.LABEL_ROUTED}!=true"  # unset too
        await route_pods(self.client, self.namespace, selector)

    async def _scale(self, replicas: int) -> None:
        """Set ``spec.replicas`` through the service's scale subresource."""
        path = resource_path(API_VERSION, api.KIND, self.namespace, self.name) + "/scale"
        body = {"spec": {"replicas": replicas}}
        await asyncio.to_thread(self.client.merge_patch, path, body)

    async def _report(self, decision: Decision, scaled: bool) -> None:
        now = now_rfc3339()
        seen = (decision.replicas, decision.active, decision.reason)
        if seen == self.reported and not scaled:
            return
        path = resource_path(API_VERSION, api.KIND, self.namespace, self.name) + "/status"
        await asyncio.to_thread(self.client.merge_patch, path, status_patch(decision, now, scaled))
        kind = "Warning" if decision.held else "Normal"
        await asyncio.to_thread(
            record_event, self.client, self.involved, kind, decision.reason, decision.message
        )
        self.reported = seen


@kopf.daemon(*RESOURCE, when=berth_mode, cancellation_timeout=10.0)
async def autoscale(
    *, stopped: kopf.DaemonStopped, body: kopf.Body, spec: kopf.Spec, memo: Shared, **_: Any
) -> None:
    """Read, decide, scale and report every tick until the service goes or leaves berth mode."""
    meta = body["metadata"]
    involved = {
        "apiVersion": API_VERSION,
        "kind": api.KIND,
        "metadata": {k: meta[k] for k in ("name", "namespace", "uid")},
    }
    async with httpx.AsyncClient() as http:
        scaler = ServiceAutoscaler(memo.client, http, involved)
        while not stopped:
            started = time.monotonic()
            try:
                parsed = api.InferenceServiceSpec.model_validate(dict(spec))
                await scaler.tick(parsed, time.time())
            except ValidationError:
                pass  # the reconciler reports the invalid spec; nothing to scale by
            except (KubeError, httpx.HTTPError) as error:
                log.warning("autoscaler %s/%s: %s; next tick", *scaler.key, error)
            except Exception:  # a bug: keep scaling the service on the next tick
                log.exception("autoscaler %s/%s failed; next tick", *scaler.key)
            await stopped.wait(max(0.0, TICK_S - (time.monotonic() - started)))
        if stopped.reason is not None and kopf.DaemonStoppingReason.FILTERS_MISMATCH in (
            stopped.reason
        ):
            try:
                await scaler.put_all_back()
            except (KubeError, httpx.HTTPError) as error:
                log.warning("autoscaler %s/%s: routing every pod again failed: %s", *scaler.key,
                            error)  # fmt: skip
