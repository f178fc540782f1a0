"""Berth's images: the builder (cluster/images.py) and the Containerfiles are one recipe, the
OCI archive is what containerd's importer expects, and the operator image carries no torch."""

import hashlib
import json
import re
import tarfile
from pathlib import Path

import pytest

from berth.cluster import images

ROOT = Path(__file__).resolve().parents[2]


def _pins(lock: Path) -> dict[str, str]:
    pins = {}
    for line in lock.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


@pytest.mark.parametrize("spec", [images.RUNTIME, images.OPERATOR], ids=lambda s: s.short)
def test_containerfile_installs_what_the_builder_installs(spec: images.ImageSpec) -> None:
    text = (ROOT / "images" / f"{spec.short}.Containerfile").read_text()
    assert "COPY images/debian-packages.txt" in text
    assert f"-r /src/images/{spec.short}.lock" in text
    assert spec.python_requirements == ROOT / "images" / f"{spec.short}.lock"
    config = images._image_config(spec)["config"]
    assert isinstance(config, dict)
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.*)$", text, re.M).group(1))  # type: ignore[union-attr]
    assert entrypoint == config["Entrypoint"]
    assert re.search(r"^USER (.*)$", text, re.M).group(1) == config["User"]  # type: ignore[union-attr]
    env_line = re.search(r"^ENV (.*)$", text, re.M).group(1).split()  # type: ignore[union-attr]
    assert set(env_line) == {e for e in config["Env"] if not e.startswith("PATH=")}
    assert re.search(r"^WORKDIR (.*)$", text, re.M).group(1) == config["WorkingDir"]  # type: ignore[union-attr]


def test_both_recipes_read_one_debian_package_list() -> None:
    packages = images.debian_packages()
    assert {"python3.11", "tini", "ca-certificates"} <= set(packages)
    assert images.PYTHON == "/usr/bin/python3.11"


def test_image_locks_pin_what_the_development_lock_pins() -> None:
    dev = _pins(ROOT / "requirements.lock")
    for lock in ("runtime.lock", "operator.lock"):
        pins = _pins(ROOT / "images" / lock)
        assert pins, lock
        differing = {name: (v, dev.get(name)) for name, v in pins.items() if dev.get(name) != v}
        assert not differing, (
            f"images/{lock} differs from requirements.lock: {differing} (make lock)"
        )


def test_operator_image_carries_no_torch() -> None:
    pins = _pins(ROOT / "images" / "operator.lock")
    assert {"kopf", "kubernetes", "pydantic", "httpx"} <= set(pins)
    heavy = [name for name in pins if name in ("torch", "triton") or name.startswith("nvidia-")]
    assert not heavy
    assert {"torch", "triton", "fastapi", "uvicorn"} <= set(_pins(ROOT / "images" / "runtime.lock"))


def test_runtime_image_carries_the_node_agents_kubernetes_client() -> None:
    """The chart's node agent runs from the runtime image and, with --node-name, talks to the API
    server (berth.operator.kube) and parses quantities (berth.operator.api_types)."""
    assert "kubernetes" in _pins(ROOT / "images" / "runtime.lock")


def test_oci_archive_names_the_image_and_every_blob_matches_its_digest(tmp_path: Path) -> None:
    layer_dir = tmp_path / "layer"
    (layer_dir / "etc").mkdir(parents=True)
    (layer_dir / "etc" / "hello").write_text("hi\n")
    tar_path = tmp_path / "layer.tar"
    digest = images._tar_layer(layer_dir, tar_path)
    assert digest == hashlib.sha256(tar_path.read_bytes()).hexdigest()
    # Reproducible: the same folder packs to the same bytes.
    assert images._tar_layer(layer_dir, tmp_path / "again.tar") == digest
    archive = tmp_path / "image.oci.tar"
    config = {"architecture": "amd64", "os": "linux", "config": {},
              "rootfs": {"type": "layers", "diff_ids": [f"sha256:{digest}"]}}  # fmt: skip
    with archive.open("wb") as out:
        images._write_oci_archive(out, "berth.local/test:abc", [(tar_path, digest)], config)
    with tarfile.open(archive) as oci:
        names = set(oci.getnames())
        index = json.load(oci.extractfile("index.json"))  # type: ignore[arg-type]
        assert json.load(oci.extractfile("oci-layout")) == {"imageLayoutVersion": "1.0.0"}  # type: ignore[arg-type]
        (entry,) = index["manifests"]
        assert entry["annotations"]["io.containerd.image.name"] == "berth.local/test:abc"
        for name in names - {"index.json", "oci-layout"}:
            blob = oci.extractfile(name).read()  # type: ignore[union-attr]
            assert name == f"blobs/sha256/{hashlib.sha256(blob).hexdigest()}"
        manifest = json.loads(oci.extractfile(f"blobs/sha256/{entry['digest'][7:]}").read())  # type: ignore[union-attr]
    assert manifest["layers"][0]["digest"] == f"sha256:{digest}"
    assert manifest["layers"][0]["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
    assert f"blobs/sha256/{manifest['config']['digest'][7:]}" in names


def test_both_recipes_put_the_same_berth_launcher_on_path() -> None:
    for spec in (images.RUNTIME, images.OPERATOR):
        text = (ROOT / "images" / f"{spec.short}.Containerfile").read_text()
        printed = re.search(r"printf '(.*?)' > /usr/local/bin/berth", text).group(1)  # type: ignore[union-attr]
        assert printed.encode().decode("unicode_escape") == images.LAUNCHER
