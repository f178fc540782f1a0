"""A missing toolchain or a failed build stops with a message that says what to do."""

import os
import subprocess
from pathlib import Path

import pytest

from berth.cluster.toolchain import BUILD_SCRIPT, ToolchainError, ensure_binaries


def test_missing_go_and_no_cache_says_how_to_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BERTH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no Go here
    monkeypatch.delenv("BERTH_K8S_BIN", raising=False)
    if any(Path(d, "go").exists() for d in ("/usr/bin", "/bin")):
        pytest.skip("a system Go is installed in /usr/bin")
    with pytest.raises(ToolchainError, match="Go is not on PATH to build them: install Go"):
        ensure_binaries()


def test_prebuilt_folder_missing_binaries_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etcd").write_text("")
    monkeypatch.setenv("BERTH_K8S_BIN", str(tmp_path))
    with pytest.raises(ToolchainError, match="lacks kube-apiserver, kube-controller-manager"):
        ensure_binaries()


def test_failed_build_exits_non_zero_naming_the_component(tmp_path: Path) -> None:
    env = {**os.environ, "BERTH_CACHE_DIR": str(tmp_path), "BERTH_ETCD_VERSION": "0.0.0-no-such"}
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], env=env, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode != 0
    assert "building etcd (about" in result.stderr
    assert "error: building etcd failed" in result.stderr
