"""The node agent's MPS daemons (``runtime/agent/mps.py``) and a runtime's side of them
(``runtime/engine/mps_client.py``).

The MPS binary runs only beside an NVIDIA driver: here the agent finds none and says so, and
the runtime stays time-sliced. The daemons' real run (two runtimes as clients of one server,
the memory cap enforced) is the device benchmark's (``benchmarks/mps_device.py``).
"""

import contextlib
import stat
import sys
from pathlib import Path

import httpx
import pytest

from berth import wire
from berth.e2e.agent_process import running_agent, wait_until_granting
from berth.runtime.agent import mps
from berth.runtime.engine.budget import GpuBudget
from berth.runtime.engine.mps_client import PID_FILE, mps_client

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))
from processes import serve_tiny, wait_ready

GIB = 1 << 30


def test_the_shared_shm_is_world_writable_with_the_sticky_bit_as_dev_shm_is(
    tmp_path: Path,
) -> None:
    root = tmp_path / "mps"
    mps.prepare(root)
    mps.prepare(root)  # again, as after an agent restart
    mode = (root / wire.MPS_SHM).stat().st_mode
    assert stat.S_IMODE(mode) == 0o1777


def test_each_gpu_has_a_daemon_of_its_own_that_sees_only_that_gpu(tmp_path: Path) -> None:
    env = mps.daemon_env(tmp_path, "GPU-a", {"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0,1"})
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-a"
    assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(tmp_path / "GPU-a")
    assert env["CUDA_MPS_LOG_DIRECTORY"] == str(tmp_path / "GPU-a" / "log")
    assert env["PATH"] == "/usr/bin"
    other = mps.daemon_env(tmp_path, "GPU-b", {})
    assert other["CUDA_MPS_PIPE_DIRECTORY"] != env["CUDA_MPS_PIPE_DIRECTORY"]


def test_a_daemon_that_keeps_exiting_is_restarted_ever_later_up_to_a_minute() -> None:
    waits = [mps.backoff_s(n) for n in range(10)]
    assert waits[:5] == [0.0, 1.0, 2.0, 4.0, 8.0]
    assert waits == sorted(waits) and waits[-1] == mps.MAX_BACKOFF_S


def test_a_pipe_folder_too_long_for_unix_sockets_is_refused_and_said(tmp_path: Path) -> None:
    """The daemon exits at once in such a folder: no restart loop, the reason on the Node."""
    states: list[str] = []
    root = tmp_path / ("x" * 60)
    daemons = mps.MpsDaemons(root, ["GPU-" + "0" * 36], binary="/bin/true", report=states.append)
    daemons.start()
    assert states and states[-1].startswith("unavailable: the pipe folder")
    assert "--mps-dir" in states[-1] and all(d.process is None for d in daemons.daemons)
    daemons.close()


def test_without_the_binary_the_node_stays_time_sliced_and_says_why(tmp_path: Path) -> None:
    states: list[str] = []
    daemons = mps.MpsDaemons(tmp_path, ["GPU-a"], binary=None, report=states.append)
    daemons.binary = None  # as on a node whose PATH has no nvidia-cuda-mps-control
    daemons.start()
    assert not daemons.available
    assert states and states[-1].startswith("unavailable: nvidia-cuda-mps-control")
    with pytest.raises(RuntimeError, match="unavailable"):
        daemons.command("GPU-a", "get_server_list")
    daemons.close()


def budget(uuid: str | None = "GPU-a") -> GpuBudget:
    return GpuBudget(20 * GIB, 30 * GIB + 123, uuid)


def test_a_runtime_joins_its_gpus_server_with_the_limit_as_its_memory_cap(tmp_path: Path) -> None:
    (tmp_path / "GPU-a").mkdir()
    (tmp_path / "GPU-a" / PID_FILE).write_text("4242\n")
    joined = mps_client(budget(), str(tmp_path))
    assert joined.joined
    assert joined.env == {
        "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "GPU-a"),
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": f"0={30 * 1024}M",  # the limit, rounded down
    }


@pytest.mark.parametrize(
    ("root", "uuid", "why"),
    [
        (None, "GPU-a", "mounts no MPS folder"),
        ("ROOT", None, "names no GPU"),
        ("ROOT", "GPU-b", "no MPS control daemon for GPU-b"),
    ],
)
def test_without_a_daemon_for_its_gpu_a_runtime_stays_time_sliced(
    tmp_path: Path, root: str | None, uuid: str | None, why: str
) -> None:
    (tmp_path / "GPU-a").mkdir()
    (tmp_path / "GPU-a" / PID_FILE).write_text("4242\n")
    client = mps_client(budget(uuid), str(tmp_path) if root else None)
    assert not client.joined and client.env == {}
    assert why in client.why and "time-sliced" in client.why


def test_an_agent_without_the_binary_serves_and_its_runtimes_serve_time_sliced(
    tmp_path: Path,
) -> None:
    """The real agent with ``--mps-dir`` on a node without the MPS binary, and a real runtime
    whose pod mounts that folder: the agent makes the folders and says why MPS is off; the
    runtime says so too, and serves."""
    root = tmp_path / "mps"
    with contextlib.ExitStack() as stack:
        agent = stack.enter_context(running_agent(
            tmp_path, "--simulate-gpus", "GPU-1:8Gi", "--lease", "3",
            "--heartbeat-interval", "0.5", "--mps-dir", str(root)))  # fmt: skip
        with agent.client() as http:
            wait_until_granting(http)
        assert stat.S_IMODE((root / wire.MPS_SHM).stat().st_mode) == 0o1777
        log = (tmp_path / "agent.log").read_text()
        assert "MPS unavailable: nvidia-cuda-mps-control is not on PATH" in log, log
        serve_log = tmp_path / "serve.log"
        url, _ = serve_tiny(stack, serve_log, "mps-off", (1 * GIB, 1 * GIB, "GPU-1"),
                            tmp_path / "agent.sock", env={wire.ENV_MPS_DIR: str(root)})  # fmt: skip
        wait_ready(url, serve_log)
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        text = serve_log.read_text()
        assert "NVIDIA MPS off: no MPS control daemon for GPU-1" in text, text
