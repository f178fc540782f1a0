"""The HTTP server's process never loads torch: the engine, which needs it, runs in its own."""

import subprocess
import sys

SERVER_MODULES = [
    "berth.runtime.server.app",
    "berth.runtime.server.cli",
    "berth.runtime.server.engine_process",
    "berth.runtime.server.chat",
    "berth.runtime.server.completions",
]


def test_importing_the_server_does_not_load_torch() -> None:
    code = "; ".join(
        [*(f"import {m}" for m in SERVER_MODULES), "import sys", "print('torch' in sys.modules)"]
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_the_engine_still_imports_on_first_use() -> None:
    code = "from berth.runtime.engine import Engine; import sys; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
