"""Kubernetes Events on the objects Berth acts on (``kubectl describe`` shows them)."""

import logging
import threading
import time
from collections import deque
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


class EventPacer:
    """Posts events from one thread, at most ``qps`` a second after a burst of ``burst``.

    A burst of binds would otherwise post as many events as binds, in the same seconds, to the
    same API server; paced, they trail the binds instead of slowing them (the pod's
    ``PodScheduled`` condition is written by the bind itself). Past ``backlog`` waiting events
    the oldest are dropped and counted, as client-go's event broadcaster drops when its queue
    is full.
    """

    def __init__(self, client: KubeClient, qps: float, burst: int = 100, backlog: int = 10_000):
        self.client, self.qps, self.burst = client, qps, burst
        self.queue: deque[tuple[Obj, str, str, str]] = deque(maxlen=backlog)
        self.ready = threading.Condition()
        self.closed = False
        self.dropped = 0
        self.thread = threading.Thread(target=self._run, name="events", daemon=True)
        self.thread.start()

    def post(self, involved: Obj, kind: str, reason: str, message: str) -> None:
        with self.ready:
            if len(self.queue) == self.queue.maxlen:
                self.dropped += 1
                if self.dropped % 1000 == 1:
                    log.warning("event backlog full: %d events dropped so far", self.dropped)
            self.queue.append((involved, kind, reason, message))
            self.ready.notify()

    def close(self) -> None:
        with self.ready:
            self.closed = True
            self.ready.notify()

    def _run(self) -> None:
        tokens, last = float(self.burst), time.monotonic()
        while True:
            with self.ready:
                while not self.queue and not self.closed:
                    self.ready.wait()
                if self.closed:
                    return
                event = self.queue.popleft()
            now = time.monotonic()
            tokens = min(float(self.burst), tokens + (now - last) * self.qps)
            last = now
            if tokens < 1.0:
                time.sleep((1.0 - tokens) / self.qps)
                tokens, last = 1.0, time.monotonic()
            tokens -= 1.0
            record_event(self.client, *event)
