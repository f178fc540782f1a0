"""Sandboxed pods' seccomp profiles, written into the kubelet's seccomp folder by the node agent.

The operator renders a sandboxed pod's profile into the pod (the annotation
``wire.POD_SECCOMP_PROFILE``) and names it in the pod's securityContext as a ``Localhost`` profile
``berth/<sha256 of the text>.json`` (``operator/seccomp.py``). The kubelet reads
``<root-dir>/seccomp/<name>`` when it creates the container, and while the file is missing it
fails that attempt and tries again with its back-off, so the agent writes the file as soon as its
pod watch sees the pod bound to this node.

Invariants: a file is written only under the name that its content hashes to, and only when the
pod asks for that name, so no pod can put other content under a name another pod uses; a file is
written once, atomically (a temporary file renamed into place), and never rewritten, since its
name fixes its content. Files stay when their pods go: they are a few kilobytes each, shared by
every pod with the same policy, and a pod being created may be about to use one.
"""

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from berth import wire
from berth.operator import seccomp

log = logging.getLogger(__name__)
Obj = dict[str, Any]
KUBELET_SECCOMP_DIR = Path("/var/lib/kubelet/seccomp")  # <the kubelet's --root-dir>/seccomp
PROFILE_NAME = re.compile(rf"^{seccomp.PROFILE_DIR}/[0-9a-f]{{64}}\.json$")


def localhost_profiles(pod: Obj) -> set[str]:
    """The ``Localhost`` seccomp profiles a pod's securityContexts name."""
    spec = pod.get("spec") or {}
    contexts = [spec.get("securityContext") or {}]
    for key in ("initContainers", "containers", "ephemeralContainers"):
        contexts += [c.get("securityContext") or {} for c in spec.get(key) or []]
    profiles = [c.get("seccompProfile") or {} for c in contexts]
    return {p["localhostProfile"] for p in profiles if p.get("type") == "Localhost"}


def wanted_profile(pod: Obj) -> tuple[str, str] | None:
    """(name, text) of the Berth profile the pod carries and asks for; None when it carries
    none, or carries one that it does not ask for under its content's name (logged)."""
    text = ((pod.get("metadata") or {}).get("annotations") or {}).get(wire.POD_SECCOMP_PROFILE)
    if text is None:
        return None
    name = seccomp.profile_name(text)
    if name not in localhost_profiles(pod):
        meta = pod.get("metadata") or {}
        log.warning("pod %s/%s carries a seccomp profile it does not ask for as %s: not written",
                    meta.get("namespace"), meta.get("name"), name)  # fmt: skip
        return None
    return name, text


class SeccompProfiles:
    """The Berth profiles in one kubelet seccomp folder."""

    def __init__(self, folder: Path = KUBELET_SECCOMP_DIR) -> None:
        self.folder = folder

    def install(self, name: str, text: str) -> bool:
        """Write profile ``text`` as ``name`` unless it is there; True when written."""
        if not PROFILE_NAME.match(name) or seccomp.profile_name(text) != name:
            raise ValueError(f"{name!r} is not the Berth profile name of that text")
        path = self.folder / name
        if path.exists():
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        log.info("seccomp profile %s installed in %s", name, self.folder)
        return True

    def pod_seen(self, pod: Obj) -> None:
        """A pod on this node was added or changed: install the profile it needs."""
        wanted = wanted_profile(pod)
        if wanted is not None:
            self.install(*wanted)
