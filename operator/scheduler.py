"""Berth's GPU scheduler: binds pods with ``schedulerName: berth`` to a node and a GPU share.

The thin shell around ``placement.place``. Two reflectors keep Nodes and berth pods in memory;
the ledger is rebuilt from bound pods' annotations on every (re)list, so after a restart the
scheduler knows every allocation before it places anything. Pending pods are gathered for a
short window and placed together (best-fit decreasing); each decision is booked in the ledger at
once and bound by a worker pool through the Binding API, whose annotations land on the pod in the
same write as its node, so no pod is ever bound without its GPU annotations. A failed bind
un-books its allocation. A pod that fits nowhere gets ``PodScheduled=False/Unschedulable`` and a
``FailedScheduling`` event, and is retried when capacity frees or nodes change.
"""

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from berth import wire
from berth.operator import gpus
from berth.operator.events import EventPacer, now_rfc3339, record_event
from berth.operator.kube import KubeClient, KubeError, Obj, reflect, resource_path
from berth.operator.placement import Allocation, Decision, GpuLedger, Node, PodRequest, place
from berth.operator.settings import OperatorSettings

log = logging.getLogger(__name__)
RETRY_UNSCHEDULABLE_S = 15.0


class GpuScheduler:
    def __init__(self, client: KubeClient, settings: OperatorSettings) -> None:
        self.client = client
        self.settings = settings
        self.policy = settings.placement_policy
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.stop = threading.Event()
        self.nodes: dict[str, Node] = {}
        self.ledger = GpuLedger()
        self.pending: dict[str, Obj] = {}  # pod key -> pod, unbound and not being bound
        self.binding: dict[str, Allocation] = {}  # pod key -> booked allocation, bind in flight
        self.unschedulable: dict[str, str] = {}  # pod key -> why it fit nowhere (parked)
        self.reported: dict[str, str] = {}  # pod key -> the reason last sent as an event
        self.last_retry = 0.0
        self.bound_total = 0
        self.pods_synced = threading.Event()
        self.nodes_synced = threading.Event()
        self.binder = ThreadPoolExecutor(settings.bind_workers, thread_name_prefix="bind")
        # Reports of pods that fit nowhere go through their own workers, and "Scheduled" events
        # are paced, so that neither delays a bind.
        self.reporter = ThreadPoolExecutor(2, thread_name_prefix="report")
        self.events = EventPacer(client, settings.event_qps)
        self.threads: list[threading.Thread] = []

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        field = f"spec.schedulerName={wire.SCHEDULER_NAME}"
        pods = resource_path("v1", "Pod")
        nodes = resource_path("v1", "Node")
        self.threads = [
            threading.Thread(target=reflect, name="watch-nodes", daemon=True,
                             args=(self.client, nodes, self._nodes_listed, self._node_event, self.stop)),
            threading.Thread(target=reflect, name="watch-pods", daemon=True,
                             args=(self.client, pods, self._pods_listed, self._pod_event, self.stop),
                             kwargs={"fieldSelector": field}),
            threading.Thread(target=self._loop, name="schedule", daemon=True),
        ]  # fmt: skip
        for thread in self.threads:
            thread.start()

    def shutdown(self) -> None:
        self.stop.set()
        with self.wake:
            self.wake.notify_all()
        self.binder.shutdown(wait=True, cancel_futures=True)
        self.reporter.shutdown(wait=False, cancel_futures=True)
        self.events.close()

    # ---- reflector callbacks (watch threads) ---------------------------------------------

    def _nodes_listed(self, items: list[Obj]) -> None:
        with self.wake:
            self.nodes = {n.name: n for n in map(gpus.node_from_object, items)}
            self.nodes_synced.set()
            self.unschedulable.clear()
            self.wake.notify_all()

    def _node_event(self, kind: str, obj: Obj) -> None:
        name = obj["metadata"]["name"]
        with self.wake:
            old = self.nodes.get(name)
            if kind == "DELETED":
                self.nodes.pop(name, None)
                return
            node = gpus.node_from_object(obj)
            self.nodes[name] = node
            if old != node:  # heartbeats change nothing we read
                self.unschedulable.clear()
                self.wake.notify_all()

    def _pods_listed(self, items: list[Obj]) -> None:
        with self.wake:
            self.ledger = gpus.ledger_from_pods(items)
            for allocation in self.binding.values():
                self.ledger.add(allocation)
            self.pending = {}
            for pod in items:
                self._track(pod)
            self.pods_synced.set()
            self.wake.notify_all()

    def _pod_event(self, kind: str, pod: Obj) -> None:
        key = gpus.pod_key(pod)
        with self.wake:
            if kind == "DELETED":
                self.pending.pop(key, None)
                self.unschedulable.pop(key, None)
                self.reported.pop(key, None)
                if self.ledger.remove(key) is not None:
                    self.unschedulable.clear()  # capacity freed: retry everyone
                self.wake.notify_all()
                return
            self._track(pod)

    def _track(self, pod: Obj) -> None:
        """Book a bound pod's allocation, or queue an unbound one (lock held)."""
        key = gpus.pod_key(pod)
        if pod.get("spec", {}).get("nodeName"):
            self.pending.pop(key, None)
            self.unschedulable.pop(key, None)
            self.reported.pop(key, None)
            allocation = gpus.pod_allocation(pod)
            if allocation is not None:
                self.ledger.add(allocation)
            elif self.ledger.remove(key) is not None:  # finished: its share is free again
                self.unschedulable.clear()
                self.wake.notify_all()
            return
        if key in self.binding or pod["metadata"].get("deletionTimestamp"):
            return
        is_new = key not in self.pending
        self.pending[key] = pod
        if is_new:
            self.wake.notify_all()

    # ---- scheduling loop -----------------------------------------------------------------

    def _loop(self) -> None:
        self.pods_synced.wait()
        self.nodes_synced.wait()
        while not self.stop.is_set():
            with self.wake:
                while not self._ready_work() and not self.stop.is_set():
                    self.wake.wait(timeout=RETRY_UNSCHEDULABLE_S)
                    if time.monotonic() - self.last_retry > RETRY_UNSCHEDULABLE_S:
                        self.unschedulable.clear()
            if self.stop.is_set():
                return
            self.stop.wait(self.settings.batch_window_s)  # let a burst of pods gather
            try:
                self.schedule_once()
            except Exception:  # keep scheduling: one bad pod must not stop the rest
                log.exception("scheduling pass failed")
                self.stop.wait(1.0)

    def _ready_work(self) -> bool:
        return any(key not in self.unschedulable for key in self.pending)

    def schedule_once(self) -> list[Decision]:
        """Place every pending pod that is not known to be unschedulable; start their binds."""
        with self.lock:
            self.last_retry = time.monotonic()
            pods = {k: p for k, p in self.pending.items() if k not in self.unschedulable}
            requests: list[PodRequest] = []
            for key, pod in pods.items():
                try:
                    requests.append(gpus.pod_request(pod))
                except ValueError as error:
                    self.unschedulable[key] = str(error)
                    if self.reported.get(key) != str(error):
                        self.reported[key] = str(error)
                        self.reporter.submit(self._report_unschedulable, pod, str(error))
            decisions = place(self.nodes.values(), self.ledger, requests, self.policy)
            for decision in decisions:
                key = decision.request.pod
                pod = pods[key]
                if decision.allocation is None:
                    self.unschedulable[key] = decision.reason
                    if self.reported.get(key) != decision.reason:
                        self.reported[key] = decision.reason
                        self.reporter.submit(self._report_unschedulable, pod, decision.reason)
                    continue
                self.pending.pop(key)
                self.binding[key] = decision.allocation
                self.ledger.add(decision.allocation)
                gpu = self.nodes[decision.allocation.node].gpus[decision.allocation.gpu_index]
                self.binder.submit(
                    self._bind,
                    pod,
                    decision.allocation,
                    gpus.binding_annotations(decision.allocation, gpu),
                )
        return decisions

    # ---- API writes (bind workers) -------------------------------------------------------

    def _bind(self, pod: Obj, allocation: Allocation, annotations: dict[str, str]) -> None:
        meta = pod["metadata"]
        body = {
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
        path = resource_path("v1", "Pod", meta["namespace"], meta["name"]) + "/binding"
        try:
            self.client.post(path, body)
        except (
            Exception
        ) as error:  # the pod moved on (deleted, bound elsewhere) or the API hiccuped
            with self.wake:
                self.binding.pop(allocation.pod, None)
                self.ledger.remove(allocation.pod)
                if not (isinstance(error, KubeError) and error.status in (404, 409)):
                    self.pending[allocation.pod] = pod
                self.wake.notify_all()
            log.warning("binding %s to %s failed: %s", allocation.pod, allocation.node, error)
            return
        with self.wake:
            self.binding.pop(allocation.pod, None)
            self.bound_total += 1
        gib = allocation.request / 2**30
        where = f"{allocation.node} GPU {allocation.gpu_index} ({gib:.1f} GiB)"
        self.events.post(pod, "Normal", "Scheduled", f"Assigned {allocation.pod} to {where}")

    def _report_unschedulable(self, pod: Obj, reason: str) -> None:
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
        except KubeError as error:
            log.info("cannot mark %s unschedulable: %s", meta["name"], error)
            return
        record_event(self.client, pod, "Warning", "FailedScheduling", reason)
