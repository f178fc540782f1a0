"""The build script names its cache folder without building anything, so a cached toolchain is
found at once (``ensure_binaries(build=False)``)."""

import os
import subprocess
from pathlib import Path

from berth.cluster import toolchain


def test_print_bin_dir_names_the_versioned_cache_and_builds_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "BERTH_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}  # no Go
    result = subprocess.run(["bash", str(toolchain.BUILD_SCRIPT), "--print-bin-dir"],
                            capture_output=True, text=True, env=env, timeout=30)  # fmt: skip
    assert result.returncode == 0, result.stderr
    folder = Path(result.stdout.strip())
    assert folder.parent.parent == tmp_path / "toolchain" and folder.name == "bin"
    assert not (tmp_path / "toolchain").exists()  # nothing was built or made
