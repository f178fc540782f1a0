"""The agent's thin Kubernetes adapter: publish the node's GPUs, report misbehaving tenants,
and mark parked tenants' pods.

All run on one background thread, so the socket's request handlers never wait on the API
server; a failed publication is retried with backoff until it lands (the scheduler cannot pack
fractions onto a node whose GPU UUIDs it does not know), and events are best effort. The
standby annotation (``berth.wire.POD_STANDBY``, "true" while parked) is what the operator
counts standby replicas by: it is retried a few times, in order, so the latest state lands;
so is the node's MPS state (``berth.wire.NODE_MPS``).
"""

import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from berth import wire
from berth.operator.events import record_event
from berth.operator.kube import KubeClient, KubeError, resource_path
from berth.runtime.agent.ledger import GpuMemory

log = logging.getLogger(__name__)
ANNOTATE_ATTEMPTS = 3


@dataclass(frozen=True)
class _Event:
    tenant: str
    reason: str
    message: str


@dataclass(frozen=True)
class _Standby:
    tenant: str
    standby: bool


@dataclass(frozen=True)
class _Mps:
    state: str


def node_annotations(gpus: Sequence[GpuMemory]) -> dict[str, str]:
    """What the scheduler reads: the UUIDs in index order and what each lets tenants share."""
    ordered = sorted(gpus, key=lambda g: g.index)
    return {
        wire.NODE_GPU_UUIDS: ",".join(g.uuid for g in ordered),
        wire.NODE_GPU_MEMORY_BYTES: ",".join(str(g.allocatable) for g in ordered),
    }


class NodePublisher:
    """Annotates the Node once (retrying), then posts Warning events about tenants' pods and
    sets their standby annotation."""

    def __init__(
        self, client: KubeClient, node: str, gpus: Sequence[GpuMemory], retry_s: float = 5.0
    ) -> None:
        self.client, self.node, self.gpus, self.retry_s = client, node, gpus, retry_s
        self.published = threading.Event()
        self.stopping = threading.Event()
        self.events: queue.Queue[_Event | _Standby | _Mps | None] = queue.Queue(maxsize=1000)
        self.thread = threading.Thread(target=self._run, name="kube", daemon=True)
        self.thread.start()

    def report(self, tenant: str, reason: str, message: str) -> None:
        """A Warning event on the tenant's pod, when the tenant id is ``namespace/name``."""
        self._put(_Event(tenant, reason, message))

    def annotate(self, tenant: str, standby: bool) -> None:
        """Mark the tenant's pod parked ("true") or resident again ("false")."""
        self._put(_Standby(tenant, standby))

    def mps(self, state: str) -> None:
        """The node's MPS state, as the Node's ``berth.dev/mps`` annotation."""
        self._put(_Mps(state))

    def _put(self, item: _Event | _Standby | _Mps) -> None:
        if not isinstance(item, _Mps) and "/" not in item.tenant:  # a local runtime, not a pod
            return
        try:
            self.events.put_nowait(item)
        except queue.Full:
            log.warning("event queue full; %s not reported", item)

    def close(self) -> None:
        self.stopping.set()
        self.events.put(None)
        self.thread.join(timeout=5)

    def _publish(self) -> bool:
        path = resource_path("v1", "Node", name=self.node)
        try:
            self.client.merge_patch(
                path, {"metadata": {"annotations": node_annotations(self.gpus)}}
            )
        except (KubeError, OSError) as error:
            log.warning("could not annotate node %s (retrying): %s", self.node, error)
            return False
        log.info("published %d GPU(s) on node %s", len(self.gpus), self.node)
        self.published.set()
        return True

    def _run(self) -> None:
        backoff = 0.5
        while not self._publish():
            if self.stopping.wait(backoff):
                return
            backoff = min(backoff * 2, self.retry_s)
        while (item := self.events.get()) is not None:
            if isinstance(item, _Mps):
                node = resource_path("v1", "Node", name=self.node)
                self._annotate(node, {wire.NODE_MPS: item.state}, f"node {self.node}")
                continue
            namespace, name = item.tenant.split("/", 1)
            path = resource_path("v1", "Pod", namespace, name)
            if isinstance(item, _Standby):
                value = "true" if item.standby else "false"
                self._annotate(path, {wire.POD_STANDBY: value}, f"pod {item.tenant}")
                continue
            try:
                pod = self.client.get(path)
            except (KubeError, OSError) as error:
                log.info("no pod for tenant %s, event %s not posted: %s", item.tenant,
                         item.reason, error)  # fmt: skip
                continue
            pod.setdefault("apiVersion", "v1")
            pod.setdefault("kind", "Pod")
            record_event(self.client, pod, "Warning", item.reason, item.message)

    def _annotate(self, path: str, annotations: dict[str, str], what: str) -> None:
        """Set ``annotations`` on the object at ``path``, retried a few times (the latest
        state must land: a standby mark, the node's MPS state)."""
        patch = {"metadata": {"annotations": annotations}}
        for attempt in range(ANNOTATE_ATTEMPTS):
            try:
                self.client.merge_patch(path, patch)
                return
            except KubeError as error:
                if error.status == 404:  # the object is gone: nothing to mark
                    return
                failure: Exception = error
            except OSError as error:
                failure = error
            if self.stopping.wait(0.5 * 2**attempt):
                break
        log.warning("could not annotate %s with %s: %s", what, annotations, failure)
