"""The node agent's watch of the Berth pods bound to its node.

A sandboxed pod needs things done on its node: its seccomp profile in the kubelet's folder before
its containers start (``seccomp_sync``) and, where the agent runs the eBPF enforcer, its egress
allowlist attached to its cgroup. One list-then-watch of the pods whose ``spec.nodeName`` is this
node and that carry Berth's service label (``kube.reflect``: it watches again from the last
version after a break and relists only when that version is gone) hands every pod it sees (added,
changed, listed) to each ``on_seen`` handler and every pod that went (deleted, missing from a
relist, or finished) to each ``on_gone`` handler, and calls each ``on_listed`` hook once a whole
list has been handed out (when what is not listed may be cleaned up). A handler that raises is
logged with the pod's name and the others still run: the next event of that pod tries again.
"""

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from berth import wire
from berth.operator.kube import KubeClient, describe, reflect, resource_path

log = logging.getLogger(__name__)
Obj = dict[str, Any]
PodHandler = Callable[[Obj], None]
FINISHED = ("Succeeded", "Failed")  # phases after which a pod runs nothing on the node


class PodWatch:
    def __init__(
        self,
        client: KubeClient,
        node: str,
        on_seen: Sequence[PodHandler],
        on_gone: Sequence[PodHandler] = (),
        on_listed: Sequence[Callable[[], None]] = (),
    ) -> None:
        self.client, self.node = client, node
        self.on_seen, self.on_gone, self.on_listed = list(on_seen), list(on_gone), list(on_listed)
        self.pods: dict[str, Obj] = {}  # uid -> the pod as last seen, while it runs here
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pod-watch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        """Stop watching (the thread notices when the server next ends a watch, within a
        minute; it is a daemon, so the process need not wait)."""
        self.stop.set()

    def _run(self) -> None:
        reflect(self.client, resource_path("v1", "Pod"), self._listed, self._event, self.stop,
                fieldSelector=f"spec.nodeName={self.node}", labelSelector=wire.LABEL_SERVICE)  # fmt: skip

    def _listed(self, items: list[Obj]) -> None:
        listed = {pod["metadata"]["uid"]: pod for pod in items}
        with self.lock:
            gone = [pod for uid, pod in self.pods.items() if uid not in listed]
        for pod in gone:
            self._gone(pod)
        for pod in items:
            self._event("ADDED", pod)
        for hook in self.on_listed:
            try:
                hook()
            except Exception:
                log.exception(
                    "pod watch: %s failed after a list", getattr(hook, "__qualname__", hook)
                )

    def _event(self, kind: str, pod: Obj) -> None:
        if kind == "DELETED" or (pod.get("status") or {}).get("phase") in FINISHED:
            self._gone(pod)
        else:
            self._seen(pod)

    def _seen(self, pod: Obj) -> None:
        with self.lock:
            self.pods[pod["metadata"]["uid"]] = pod
        _each(self.on_seen, pod)

    def _gone(self, pod: Obj) -> None:
        with self.lock:
            known = self.pods.pop(pod["metadata"]["uid"], None)
        if known is not None:
            _each(self.on_gone, pod)


def _each(handlers: Sequence[PodHandler], pod: Obj) -> None:
    for handler in handlers:
        try:
            handler(pod)
        except Exception:
            log.exception("pod watch: %s failed on %s", getattr(handler, "__qualname__", handler),
                          describe({"kind": "Pod", **pod}))  # fmt: skip
