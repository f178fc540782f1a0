"""The node agent's MPS daemon on a real GPU: a daemon that dies is restarted, and the next
runtime joins the new one. Needs an NVIDIA driver with its MPS binary (the device machine);
skipped elsewhere (``test_mps.py`` covers the rest without a GPU)."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from berth.runtime.agent import mps
from berth.runtime.engine.budget import GpuBudget
from berth.runtime.engine.mps_client import PID_FILE, mps_client

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(
    shutil.which(mps.CONTROL) is None or not torch.cuda.is_available(),
    reason=f"needs a CUDA GPU and {mps.CONTROL}",
)

# A client: allocates, runs a matmul, and says which MPS server (if any) it talks to.
CLIENT = """
import torch
x = torch.randn(1024, 1024, device="cuda")
print("ok", float((x @ x).sum().isfinite()))
"""


def _gpu_uuid() -> str:
    out = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return out.stdout.split()[0]


def _wait(what: str, predicate, timeout_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout_s} s")


def _run_client(root: Path, uuid: str) -> str:
    """A runtime's start as ``berth serve`` does it: the environment ``mps_client`` gives."""
    client = mps_client(GpuBudget(4 << 30, 8 << 30, uuid), str(root))
    assert client.joined, client.why
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": uuid, **client.env}
    done = subprocess.run([sys.executable, "-c", CLIENT], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-2000:]
    return done.stdout


def test_a_killed_daemon_is_restarted_and_the_next_runtime_joins_it() -> None:
    # pytest's tmp_path is too long for the daemon's unix sockets (mps.MAX_PIPE_DIR)
    uuid, root = _gpu_uuid(), Path(tempfile.mkdtemp(prefix="mps-", dir="/tmp"))
    mps.prepare(root)
    states: list[str] = []
    daemons = mps.MpsDaemons(root, [uuid], report=states.append)
    daemons.start()
    try:
        _wait("the daemon's pid file", lambda: (mps.pipe_dir(root, uuid) / PID_FILE).exists())
        _run_client(root, uuid)
        servers = daemons.command(uuid, "get_server_list")
        assert servers.strip().isdigit(), f"no MPS server served the client: {servers!r}"
        print("before the kill: daemon", daemons.daemons[0].process.pid, "servers", servers)

        first = daemons.daemons[0].process
        assert first is not None
        first.kill()  # as the OOM killer or a crash would
        first.wait()
        _wait("a restart", lambda: any(s.startswith("restarting") for s in states))
        _wait("a new daemon", lambda: daemons.daemons[0].process not in (None, first))
        _wait("the new daemon running", lambda: states[-1] == "running on 1 GPU(s)")
        # The new daemon serves the next runtime (a server of the old one may linger).
        _wait(
            "the new daemon answering",
            lambda: daemons.command(uuid, "get_server_list") is not None,
        )
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
