"""The node agent's MPS daemon on a real GPU: a daemon that dies is restarted, and the next
runtime joins the new one. Needs an NVIDIA driver with its MPS binary (the device machine);
skipped elsewhere (``test_mps.py`` covers the rest without a GPU)."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from berth.runtime.agent import gpus, mps
from berth.runtime.engine.budget import GpuBudget
from berth.runtime.engine.mps_client import PID_FILE, mps_client

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))
from processes import wait_until

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(
    shutil.which(mps.CONTROL) is None or not torch.cuda.is_available(),
    reason=f"needs a CUDA GPU and {mps.CONTROL}",
)

# A client: allocates and runs a matmul.
CLIENT = """
import torch
x = torch.randn(1024, 1024, device="cuda")
print("ok", float((x @ x).sum().isfinite()))
"""


def _run_client(root: Path, uuid: str) -> None:
    """A runtime's start as ``berth serve`` does it: the environment ``mps_client`` gives."""
    client = mps_client(GpuBudget(4 << 30, 8 << 30, uuid), str(root))
    assert client.joined, client.why
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": uuid, **client.env}
    done = subprocess.run([sys.executable, "-c", CLIENT], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-2000:]


def test_a_killed_daemon_is_restarted_and_the_next_runtime_joins_it() -> None:
    # pytest's tmp_path is too long for the daemon's unix sockets (mps.MAX_PIPE_DIR)
    uuid, root = gpus.nvml()[0].uuid, Path(tempfile.mkdtemp(prefix="mps-", dir="/tmp"))
    mps.prepare(root)
    states: list[str] = []
    daemons = mps.MpsDaemons(root, [uuid], report=states.append)
    daemons.start()
    try:
        wait_until(
            lambda: (mps.pipe_dir(root, uuid) / PID_FILE).exists(), "the daemon's pid file", 20
        )
        _run_client(root, uuid)
        servers = daemons.command(uuid, "get_server_list")
        assert servers.strip().isdigit(), f"no MPS server served the client: {servers!r}"
        print("before the kill: daemon", daemons.daemons[0].process.pid, "servers", servers)

        first = daemons.daemons[0].process
        assert first is not None
        first.kill()  # as the OOM killer or a crash would
        first.wait()
        wait_until(lambda: any(s.startswith("restarting") for s in states), "a restart", 20)
        wait_until(lambda: daemons.daemons[0].process not in (None, first), "a new daemon", 20)
        wait_until(lambda: states[-1] == "running on 1 GPU(s)", "the new daemon running", 20)
        # The new daemon serves the next runtime (a server of the old one may linger).
        _run_client(root, uuid)
        after = daemons.command(uuid, "get_server_list")
        print("after the restart: daemon", daemons.daemons[0].process.pid, "servers", after,
              "states", states)  # fmt: skip
        assert after.strip(), "no server after the restart"
    finally:
        daemons.close()
    assert all(d.process is None for d in daemons.daemons)
    left = [
        pid
        for name in ("nvidia-cuda-mps-control", "nvidia-cuda-mps-server")
        for pid in subprocess.run(
            ["pgrep", "-x", name], capture_output=True, text=True
        ).stdout.split()
    ]
    assert not left, f"MPS processes left after close: {left}"
