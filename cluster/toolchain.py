"""Where the control-plane binaries are, building them on first use with cluster/build-k8s.sh."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

BUILD_SCRIPT = Path(__file__).resolve().parent / "build-k8s.sh"
BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "kubectl",
    "helm",
    "kubelet",
    "kube-proxy",
    "crictl",
)


class ToolchainError(RuntimeError):
    """The binaries are missing and could not be built; the message says what to do."""


def ensure_binaries(build: bool = True) -> Path:
    """Return the folder holding every binary in BINARIES, building what is missing.

    The build script caches by version, so this is instant once a machine has paid the build.
    ``BERTH_K8S_BIN`` points at a folder of prebuilt binaries instead.
    """
    override = os.environ.get("BERTH_K8S_BIN")
    if override:
        folder = Path(override)
        missing = [b for b in BINARIES if not (folder / b).is_file()]
        if missing:
            raise ToolchainError(f"BERTH_K8S_BIN={folder} lacks {', '.join(missing)}")
        return folder
    cached = _cached_folder()
    if cached is not None:
        return cached
    if not build:
        raise ToolchainError("the Kubernetes binaries are not built yet: run `make toolchain`")
    if shutil.which("go") is None:
        raise ToolchainError(
            "the Kubernetes binaries are not cached and Go is not on PATH to build them: "
            "install Go (https://go.dev/doc/install, >= 1.24) or set BERTH_K8S_BIN to a folder "
            f"holding {', '.join(BINARIES)}"
        )
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=sys.stderr, text=True
    )
    if result.returncode != 0:
        raise ToolchainError(f"{BUILD_SCRIPT} failed (exit {result.returncode}); see its log above")
    return Path(result.stdout.strip().splitlines()[-1])


def _cached_folder() -> Path | None:
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--print-bin-dir"], capture_output=True, text=True
    )
    folder = Path(result.stdout.strip())
    if result.returncode == 0 and all((folder / b).is_file() for b in BINARIES):
        return folder
    return None
