"""Whether the pod is in its Service's rotation: the ``berth.dev/routed`` label that the
operator's autoscaler moves (``operator/routing.py``).

kube-proxy picks a pod per connection, so a keep-alive client stays on the pod it first reached
even after the label takes that pod out of the endpoints: it would keep a replica that should
park busy, and never spread onto new ones. Out of the rotation, every response closes its
connection (``app.CloseConnections``), so the client's next request reconnects through the
Service to a routed replica.

Two sources say it, and the newer word wins. The operator tells the runtime when it moves the
label (``POST /admin/rotation``), which takes effect at once; the downward API's labels file,
read at most once a second, is the backstop when that call is lost (or the runtime restarted),
but the kubelet rewrites it only on its next sync of the pod, up to a minute or more after the
change. Outside Kubernetes (no file, never told) the pod counts as routed.
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
        self._file_out: bool | None = None  # the file's word when last read
        self._out = False

    def out(self) -> bool:
        """True once the operator or the pod's label says the Service no longer routes to it."""
        if self.clock() - self._read_at >= READ_EVERY_S:
            self._read()
        return self._out

    def tell(self, routed: bool) -> None:
        """The operator's word: it holds until the labels file changes after it."""
        self._read()  # the file's word now is older than this one
        self._out = not routed

    def _read(self) -> None:
        self._read_at = self.clock()
        try:
            labels = parse_annotations(self.path.read_text())
        except OSError:
            labels = {}
        file_out = labels.get(wire.LABEL_ROUTED) == "false"
        if file_out != self._file_out:  # a change, newer than whatever was told before
            self._file_out = file_out
            self._out = file_out
