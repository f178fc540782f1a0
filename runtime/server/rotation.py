"""Whether the pod is in its Service's rotation: the ``berth.dev/routed`` label that the
operator's autoscaler moves (``operator/routing.py``), as the downward API's labels file shows it.

kube-proxy picks a pod per connection, so a keep-alive client stays on the pod it first reached
even after the label takes that pod out of the endpoints: it would keep a replica that should
park busy, and never spread onto new ones. Out of the rotation, every response closes its
connection (``app.CloseConnections``), so the client's next request reconnects through the
Service to a routed replica. The file is read at most once a second; the kubelet rewrites it
within seconds of a label change. Outside Kubernetes (no file) the pod counts as routed.
"""

import time
from collections.abc import Callable
from pathlib import Path

from berth import wire
from berth.runtime.engine.budget import parse_annotations

LABELS_FILE = "labels"  # the downward-API item holding metadata.labels
READ_EVERY_S = 1.0


class Rotation:
    def __init__(
        self, pod_info_dir: str | Path, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = Path(pod_info_dir) / LABELS_FILE
        self.clock = clock
        self._read_at = -READ_EVERY_S
        self._out = False

    def out(self) -> bool:
        """True once the pod's label says the Service no longer routes to it."""
        now = self.clock()
        if now - self._read_at >= READ_EVERY_S:
            self._read_at = now
            try:
                labels = parse_annotations(self.path.read_text())
            except OSError:
                labels = {}
            self._out = labels.get(wire.LABEL_ROUTED) == "false"
        return self._out
