"""Berth's GPU scheduler: binds pods with ``schedulerName: berth`` to a node and a GPU share.

The thin shell around ``placement.place``. Reflectors keep Nodes, berth pods, the GPU reservation
pods and what every bound pod takes of its node in memory (CPU, memory, a pod slot, whoever
scheduled it: kube-scheduler never checks the pods Berth binds, so Berth must); the ledger is
rebuilt from bound pods' annotations on every (re)list, so after a restart the scheduler knows
every allocation before it places anything. Pending pods are gathered for a short window and
placed together (best-fit decreasing); each decision is *assumed* in the ledger at once
(``ledger.py`` draws the states) and bound by a worker pool: the worker checks that an
InferenceService owns the pod, makes sure the GPU has its reservation pod, and POSTs the
Binding, whose annotations land on the pod in the same write as its node. An
assumed share stays booked until the API server shows the pod bound (a watch event or a list),
so neither a list taken before the bind nor a bind that timed out but landed books a GPU twice.
A pod that fits nowhere gets ``PodScheduled=False/Unschedulable`` and a ``FailedScheduling``
event, and is retried when capacity frees or nodes change. A handler that fails on one object
reports it (a log line and a ``FailedScheduling`` event on it) and the loops go on.
"""

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from berth import wire
from berth.operator import gpus
from berth.operator.binder import Binder, Outcome
from berth.operator.events import EventPacer, record_event
from berth.operator.health import Health
from berth.operator.kube import (
    KubeClient,
    KubeError,
    Obj,
    describe,
    reflect,
    report_bad_object,
    resource_path,
)
from berth.operator.ledger import Allocation
from berth.operator.ownership import OwnerCheck
from berth.operator.placement import Decision, GpuLedger, Node, PodRequest, place
from berth.operator.reservations import LABEL_RESERVATION, GpuReservations
from berth.operator.settings import OperatorSettings

log = logging.getLogger(__name__)
RETRY_UNSCHEDULABLE_S = 15.0


class GpuScheduler:
    def __init__(
        self, client: KubeClient, settings: OperatorSettings, health: Health | None = None
    ) -> None:
        self.client = client
        self.settings = settings
        self.policy = settings.placement_policy
        self.health = health or Health(stuck_after_s=settings.loop_stuck_s)
        self.metrics = self.health.metrics
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.stop = threading.Event()
        self.nodes: dict[str, Node] = {}
        self.ledger = GpuLedger()
        self.pending: dict[str, Obj] = {}  # pod key -> pod, unbound and not assumed
        self.assumed: dict[str, Obj] = {}  # pod key -> its latest unbound object, while assumed
        # pod key -> uid, for every pod seen bound: a bind is final (nodeName is never unset),
        # so a list or event showing that pod unbound predates its bind and is not acted on
        self.bound: dict[str, str] = {}
        self.unschedulable: dict[str, str] = {}  # pod key -> why it fit nowhere (parked)
        self.refused: dict[str, str] = {}  # pod key -> why it may not have a share at all
        self.reported: dict[str, str] = {}  # pod key -> the reason last sent as an event
        self.bad: dict[str, str] = {}  # object uid -> the handler error last reported on it
        self.last_retry = 0.0
        self.bound_total = 0
        self.pods_synced = threading.Event()
        self.node_pods_synced = threading.Event()
        self.nodes_synced = threading.Event()
        self.reservations_synced = threading.Event()
        self.owners = OwnerCheck(client)
        self.reservations = GpuReservations(
            client,
            settings.reservation_namespace,
            settings.reservation_image,
            settings.reservation_priority_class,
        )
        if not settings.gpu_reservations:
            self.reservations_synced.set()
        self.binder = Binder(
            client,
            self.owners if settings.require_owner else None,
            self.reservations if settings.gpu_reservations else None,
        )
        self.bind_pool = ThreadPoolExecutor(settings.bind_workers, thread_name_prefix="bind")
        # Reports of pods that fit nowhere go through their own workers, and "Scheduled" events
        # are paced, so that neither delays a bind.
        self.reporter = ThreadPoolExecutor(2, thread_name_prefix="report")
        self.events = EventPacer(client, settings.event_qps)
        self.threads: list[threading.Thread] = []
        self.metrics.queue_depth.set_function(lambda: len(self.pending))
        self.metrics.unschedulable.set_function(lambda: len(self.unschedulable))
        self.metrics.assumed.set_function(lambda: len(self.ledger.assumed))
        self.metrics.reservations.set_function(self.reservations.count)

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        pods = resource_path("v1", "Pod")
        watches = [
            ("nodes", resource_path("v1", "Node"), self._nodes_listed, self._node_event, {}),
            ("pods", pods, self._pods_listed, self._pod_event,
             {"fieldSelector": f"spec.schedulerName={wire.SCHEDULER_NAME}"}),
            ("node-pods", pods, self._node_pods_listed, self._node_pod_event,
             {"fieldSelector": "spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed"}),
        ]  # fmt: skip
        if self.settings.gpu_reservations:
            watches.append(("reservations", self.reservations.path, self._reservations_listed,
                            self._reservation_event, {"labelSelector": LABEL_RESERVATION}))  # fmt: skip
        for name, path, listed, changed, params in watches:
            health = self.health.loop(f"watch-{name}")
            thread = threading.Thread(target=reflect, name=f"watch-{name}", daemon=True,
                                      args=(self.client, path, listed, changed, self.stop),
                                      kwargs={**params, "health": health, "on_error": self._report_bad})  # fmt: skip
            self.health.loop(health.name, thread)
            self.threads.append(thread)
        loop = threading.Thread(target=self._loop, name="schedule", daemon=True)
        self.health.loop("schedule", loop)
        self.threads.append(loop)
        for thread in self.threads:
            thread.start()

    def shutdown(self) -> None:
        self.stop.set()
        with self.wake:
            self.wake.notify_all()
        self.bind_pool.shutdown(wait=True, cancel_futures=True)
        self.reporter.shutdown(wait=False, cancel_futures=True)
        self.events.close()

    # ---- reflector callbacks (watch threads) ---------------------------------------------

    def _nodes_listed(self, items: list[Obj]) -> None:
        nodes = {}
        for obj in items:
            try:
                node = gpus.node_from_object(obj)
            except Exception as error:
                report_bad_object(
                    obj, error, "node list", self.health.loop("watch-nodes"), self._report_bad
                )
                continue
            nodes[node.name] = node
        with self.wake:
            self.nodes = nodes
            self.nodes_synced.set()
            self.unschedulable.clear()
            self.wake.notify_all()

    def _node_event(self, kind: str, obj: Obj) -> None:
        name = obj["metadata"]["name"]
        node = None if kind == "DELETED" else gpus.node_from_object(obj)
        with self.wake:
            old = self.nodes.get(name)
            if node is None:
                self.nodes.pop(name, None)
                return
            self.nodes[name] = node
            if old != node:  # heartbeats change nothing we read
                self.unschedulable.clear()
                self.wake.notify_all()

    def _pods_listed(self, items: list[Obj]) -> None:
        """A (re)list replaces the ledger's Added bookings; an assumed share survives it while
        the list still shows its pod unbound, and so does the booking of a pod already seen
        bound (the list may predate the bind: a bind is final)."""
        allocations, unbound, good = [], set(), []
        for pod in items:
            try:
                key = gpus.pod_key(pod)
                if pod.get("spec", {}).get("nodeName"):
                    allocation = gpus.pod_allocation(pod)
                    if allocation is not None:
                        allocations.append(allocation)
                else:
                    unbound.add(key)
                good.append(pod)
            except Exception as error:
                report_bad_object(
                    pod, error, "pod list", self.health.loop("watch-pods"), self._report_bad
                )
        with self.wake:
            listed = {gpus.pod_key(pod) for pod in good}
            self.bound = {k: uid for k, uid in self.bound.items() if k in listed}
            stale = {gpus.pod_key(pod) for pod in good if self._seen_bound(pod)}
            for key in self.ledger.relist(allocations, unbound - stale, keep=stale):
                self.assumed.pop(key, None)
            self.pending = {}
            for pod in good:
                self._track(pod)
            self.assumed = {k: p for k, p in self.assumed.items() if self.ledger.is_assumed(k)}
            self.pods_synced.set()
            self.wake.notify_all()

    def _pod_event(self, kind: str, pod: Obj) -> None:
        key = gpus.pod_key(pod)
        with self.wake:
            if kind == "DELETED":
                self.pending.pop(key, None)
                self.assumed.pop(key, None)
                self.unschedulable.pop(key, None)
                self.refused.pop(key, None)
                self.reported.pop(key, None)
                self.bad.pop(pod["metadata"].get("uid", ""), None)
                self.bound.pop(key, None)
                self.owners.forget(pod)
                if self.ledger.remove(key) is not None:
                    self.unschedulable.clear()  # capacity freed: retry everyone
                self.wake.notify_all()
                return
            self._track(pod)

    def _track(self, pod: Obj) -> None:
        """Confirm a bound pod's allocation, or queue an unbound one (lock held)."""
        key = gpus.pod_key(pod)
        if pod.get("spec", {}).get("nodeName"):
            allocation = gpus.pod_allocation(pod)  # may raise: then nothing changes
            self.bound[key] = pod["metadata"].get("uid", "")
            self.pending.pop(key, None)
            self.assumed.pop(key, None)
            self.unschedulable.pop(key, None)
            self.reported.pop(key, None)
            if allocation is not None:
                self.ledger.confirm(allocation)
            elif self.ledger.remove(key) is not None:  # finished: its share is free again
                self.unschedulable.clear()
                self.wake.notify_all()
            return
        if self.ledger.is_assumed(key):  # an event from before the bind landed
            self.assumed[key] = pod
            return
        if self._seen_bound(pod):  # likewise, after the bind was seen
            return
        if pod["metadata"].get("deletionTimestamp"):
            return
        is_new = key not in self.pending
        self.pending[key] = pod
        if is_new:
            self.wake.notify_all()

    def _seen_bound(self, pod: Obj) -> bool:
        """This very pod (not one made again under its name) was seen bound (lock held)."""
        uid = self.bound.get(gpus.pod_key(pod))
        return uid is not None and uid == pod["metadata"].get("uid", "")

    def _node_pods_listed(self, items: list[Obj]) -> None:
        """Every bound pod, any scheduler's: what it takes of its node replaces the tally."""
        on_nodes = {}
        for pod in items:
            try:
                occupant = gpus.pod_occupancy(pod)
                if occupant is not None:
                    on_nodes[gpus.pod_key(pod)] = occupant
            except Exception as error:
                report_bad_object(
                    pod, error, "pod list", self.health.loop("watch-node-pods"), self._report_bad
                )
        with self.wake:
            self.ledger.relist_nodes(on_nodes)
            self.node_pods_synced.set()
            self.unschedulable.clear()
            self.wake.notify_all()

    def _node_pod_event(self, kind: str, pod: Obj) -> None:
        key = gpus.pod_key(pod)
        occupant = None if kind == "DELETED" else gpus.pod_occupancy(pod)
        with self.wake:
            if occupant is not None:
                self.ledger.on_node(key, *occupant)
                return
            gone = self.ledger.off_node(key)
            node = self.nodes.get(gone[0]) if gone is not None else None
            if node is not None and node.gpus:  # room freed where Berth places: retry everyone
                self.unschedulable.clear()
                self.wake.notify_all()

    def _reservations_listed(self, items: list[Obj]) -> None:
        self.reservations.listed(items)
        self.reservations_synced.set()
        with self.wake:
            self.wake.notify_all()

    def _reservation_event(self, kind: str, obj: Obj) -> None:
        self.reservations.event(kind, obj)
        if kind == "DELETED":
            with self.wake:
                self.wake.notify_all()  # a GPU with tenants may have lost its reservation

    def _report_bad(self, obj: Obj, error: Exception) -> None:
        """An event on an object a handler failed on, once per object and error."""
        meta = obj.get("metadata") or {}
        if not meta.get("namespace") or not meta.get("uid"):
            return  # a Node or a garbled object: the log line is the report
        message = f"berth cannot use this object: {error}"
        with self.lock:
            if self.bad.get(meta["uid"]) == message:
                return
            self.bad[meta["uid"]] = message
        self.reporter.submit(record_event, self.client, obj, "Warning", "FailedScheduling", message)

    # ---- scheduling loop -----------------------------------------------------------------

    def _loop(self) -> None:
        loop = self.health.loop("schedule")
        events = (self.pods_synced, self.node_pods_synced, self.nodes_synced)
        for synced in (*events, self.reservations_synced):
            while not synced.wait(timeout=5.0) and not self.stop.is_set():
                loop.beat()
        loop.mark_synced()
        while not self.stop.is_set():
            try:
                self._wait_for_work()
                if self.stop.is_set():
                    return
                self.stop.wait(self.settings.batch_window_s)  # let a burst of pods gather
                self.schedule_once()
            except Exception:  # keep scheduling: one bad pod must not stop the rest
                log.exception("scheduling pass failed")
                loop.restarted()
                self.stop.wait(1.0)

    def _wait_for_work(self) -> None:
        with self.wake:
            while not self.stop.is_set():
                self._check_due()
                self._sync_reservations()
                if self._ready_work():
                    return
                deadline = self.ledger.next_deadline()
                timeout = RETRY_UNSCHEDULABLE_S
                if deadline is not None:
                    timeout = max(0.05, min(timeout, deadline - time.monotonic()))
                self.wake.wait(timeout=timeout)
                self.health.loop("schedule").beat()
                if time.monotonic() - self.last_retry > RETRY_UNSCHEDULABLE_S:
                    self.unschedulable.clear()

    def _ready_work(self) -> bool:
        return any(k not in self.unschedulable and k not in self.refused for k in self.pending)

    def _check_due(self) -> None:
        """Assumed shares whose bind was never confirmed in time: ask the API server (lock held)."""
        for key in self.ledger.due(time.monotonic()):
            self.reporter.submit(self._recheck, key)

    def _recheck(self, key: str) -> None:
        """A fresh read decides an unconfirmed share: bound keeps it (as the API server has it),
        unbound frees it and places the pod again, gone frees it. A lagging watch therefore
        never frees a share that is really bound."""
        namespace, name = key.split("/", 1)
        pod: Obj | None = None
        try:
            pod = self.client.get(resource_path("v1", "Pod", namespace, name))
        except Exception as error:
            if not (isinstance(error, KubeError) and error.status == 404):
                with self.wake:  # cannot tell now: ask again after another deadline
                    self.ledger.finish_binding(key, time.monotonic() + self.settings.assume_ttl_s)
                    self.wake.notify_all()
                return
        with self.wake:
            if not self.ledger.is_assumed(key):
                return  # a watch event or a list decided first
            if pod is not None and pod.get("spec", {}).get("nodeName"):
                try:
                    self._track(pod)  # confirms it
                except ValueError:
                    self.ledger.remove(key)
                return
            self.metrics.expired.inc()
            self.ledger.forget(key)
            self.assumed.pop(key, None)
            if pod is not None:
                log.warning(
                    "bind of %s never landed: its share is freed and it is placed again", key
                )
                self.pending[key] = pod
            self.unschedulable.clear()
            self.wake.notify_all()

    def _sync_reservations(self) -> None:
        """Reservations follow the ledger's used GPUs (lock held; the API calls run later)."""
        if self.settings.gpu_reservations:
            self.reservations.sync(self.ledger.used_gpus(), self.reporter.submit)

    def schedule_once(self) -> list[Decision]:
        """Place every pending pod that is not known to be unschedulable; start their binds."""
        with self.lock:
            self.last_retry = time.monotonic()
            pods = {
                k: p
                for k, p in self.pending.items()
                if k not in self.unschedulable and k not in self.refused
            }
            requests: list[PodRequest] = []
            for key, pod in pods.items():
                try:
                    requests.append(gpus.pod_request(pod))
                except ValueError as error:
                    self._park(key, pod, str(error))
            decisions = place(self.nodes.values(), self.ledger, requests, self.policy)
            for decision in decisions:
                key = decision.request.pod
                pod = pods[key]
                if decision.allocation is None:
                    self._park(key, pod, decision.reason)
                    continue
                self.pending.pop(key)
                self.assumed[key] = pod
                self.ledger.assume(decision.allocation)
                gpu = self.nodes[decision.allocation.node].gpus[decision.allocation.gpu_index]
                self.bind_pool.submit(
                    self._bind,
                    pod,
                    decision.allocation,
                    gpus.binding_annotations(decision.allocation, gpu),
                )
        return decisions

    def _park(self, key: str, pod: Obj, reason: str) -> None:
        """Keep a pod out of placement until capacity changes, and say why once (lock held)."""
        self.unschedulable[key] = reason
        if self.reported.get(key) != reason:
            self.reported[key] = reason
            self.reporter.submit(self.binder.report_unschedulable, pod, reason)

    # ---- API writes (bind workers) -------------------------------------------------------

    def _bind(self, pod: Obj, allocation: Allocation, annotations: dict[str, str]) -> None:
        """One bind worker's job: the API calls (``binder.py``), then its outcome applied."""
        key = allocation.pod
        result = self.binder.bind(pod, allocation, annotations)
        if result.metric:
            self.metrics.bind_failures.labels(result.metric).inc()
        with self.wake:
            if result.outcome in (Outcome.BOUND, Outcome.UNCERTAIN):
                # confirmed by a watch event or a list; freed at the deadline if never
                self.ledger.finish_binding(key, time.monotonic() + self.settings.assume_ttl_s)
            else:
                self.ledger.forget(key)
                if self.assumed.pop(key, None) is not None:
                    self.pending[key] = pod
                    if result.outcome is Outcome.NOT_OWNED:
                        self.refused[key] = result.reason  # never placed again
                    self._park(key, pod, result.reason)
            if result.outcome is Outcome.BOUND:
                self.bound_total += 1
            self.wake.notify_all()
        if result.outcome is Outcome.BOUND:
            self.metrics.binds.inc()
            gib = allocation.request / 2**30
            where = f"{allocation.node} GPU {allocation.gpu_index} ({gib:.1f} GiB)"
            self.events.post(pod, "Normal", "Scheduled", f"Assigned {key} to {where}")
        elif result.outcome is Outcome.NOT_OWNED:
            self.metrics.refused.inc()
            log.warning("%s refused a GPU share: %s", describe(pod), result.reason)
        else:
            log.warning(
                "%s to %s: %s (%s)", key, allocation.node, result.reason, result.outcome.value
            )
