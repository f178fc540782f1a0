"""NVIDIA MPS for the runtimes that share a GPU: one control daemon per GPU, run by the agent.

Time-sliced, two runtimes on one GPU take turns: on an H200 two halves served 86 % of one whole
(``benchmarks/results/colocate-h200.md``). Under MPS their kernels run side by side: 96 %. So
with ``--mps-dir`` the agent runs ``nvidia-cuda-mps-control -f`` for each of its GPUs, with
``CUDA_VISIBLE_DEVICES`` that GPU's UUID and its pipes in ``<dir>/<uuid>``: a runtime whose
budget names that GPU connects there (``berth.runtime.engine.mps_client``) and sees exactly one
device, its own, whatever the server sees. One daemon per GPU rather than one per node, so a
client never enumerates devices through a server that sees the whole node.

Who may share a server: an MPS server runs as one user, and clients of another user wait until
it exits. Every runtime pod runs as the runtime image's user (65532), so that holds; sandboxed
agent workloads never get the pipes (MPS shares ``/dev/shm`` and a server between clients).

The daemons are the agent's children: started when it starts, restarted when one exits
(after a back-off that grows to a minute), told to ``quit`` when it stops. A node without the
MPS binary (no driver, or not injected into the agent's container) keeps running time-sliced:
the agent logs why and publishes it (``state``). The control daemon starts servers on demand,
as the driver does, so a GPU with no client holds nothing.
"""

import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from berth import wire

log = logging.getLogger(__name__)

CONTROL = "nvidia-cuda-mps-control"
MAX_BACKOFF_S = 60.0
STOP_TIMEOUT_S = 10.0
# The daemon makes unix sockets in its pipe folder; a socket's path must fit in 108 bytes, and a
# longer folder makes the daemon exit at once with 1 (seen on an H100 from a pytest temp dir).
# The default /run/berth/mps/<uuid> is 55.
MAX_PIPE_DIR = 80


def prepare(root: Path) -> None:
    """The node's MPS folder and the ``/dev/shm`` that servers and clients share (``shm``,
    world-writable with the sticky bit, as ``/dev/shm`` is: runtimes run as their own user).
    Made whether or not MPS can run here, so that runtime pods, which mount both, start."""
    shm = root / wire.MPS_SHM
    shm.mkdir(parents=True, exist_ok=True)
    shm.chmod(0o1777)


def pipe_dir(root: Path, uuid: str) -> Path:
    """Where one GPU's daemon, its server and its clients meet."""
    return root / uuid


def daemon_env(root: Path, uuid: str, base: dict[str, str]) -> dict[str, str]:
    """The environment of one GPU's control daemon (and the servers it starts)."""
    pipes = pipe_dir(root, uuid)
    return {
        **base,
        "CUDA_VISIBLE_DEVICES": uuid,
        "CUDA_MPS_PIPE_DIRECTORY": str(pipes),
        "CUDA_MPS_LOG_DIRECTORY": str(pipes / "log"),
    }


def backoff_s(failures: int) -> float:
    """Seconds before restarting a daemon that exited ``failures`` times in a row."""
    return 0.0 if failures <= 0 else min(MAX_BACKOFF_S, 2.0 ** (failures - 1))


@dataclass
class _Daemon:
    uuid: str
    process: subprocess.Popen[bytes] | None = None
    failures: int = 0
    next_start: float = 0.0
    started_at: float = 0.0


class MpsDaemons:
    """One ``nvidia-cuda-mps-control -f`` per GPU, kept running until ``close``."""

    def __init__(
        self,
        root: Path,
        uuids: list[str],
        *,
        binary: str | None = None,
        report: Callable[[str], None] | None = None,
        stable_s: float = 30.0,
    ) -> None:
        self.root = root
        self.binary = binary if binary is not None else shutil.which(CONTROL)
        self.report = report
        self.stable_s = stable_s  # a daemon up this long has its failure count reset
        self.daemons = [_Daemon(u) for u in uuids]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.state = "starting"

    @property
    def available(self) -> bool:
        return self.binary is not None

    def start(self) -> None:
        """Start every GPU's daemon and the thread that restarts them; without the binary,
        say so and do nothing (the node stays time-sliced)."""
        if self.binary is None:
            self._set_state(f"unavailable: {CONTROL} is not on PATH (no NVIDIA driver, or the "
                            "agent's container lacks the driver's compute utilities)")  # fmt: skip
            log.warning("MPS %s", self.state)
            return
        longest = max((str(pipe_dir(self.root, d.uuid)) for d in self.daemons), key=len)
        if len(longest) > MAX_PIPE_DIR:
            self._set_state(f"unavailable: the pipe folder {longest} is {len(longest)} "
                            f"characters long, more than the {MAX_PIPE_DIR} its unix sockets "
                            "allow; give the agent a shorter --mps-dir")  # fmt: skip
            log.warning("MPS %s", self.state)
            return
        for daemon in self.daemons:
            pipe_dir(self.root, daemon.uuid).joinpath("log").mkdir(parents=True, exist_ok=True)
        self._supervise_once(time.monotonic())
        self._thread = threading.Thread(target=self._run, name="mps", daemon=True)
        self._thread.start()

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            if self.report is not None:
                self.report(state)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._supervise_once(time.monotonic())

    def _supervise_once(self, now: float) -> None:
        """Start what is not running and due; count exits; publish the state."""
        with self._lock:
            if self._stop.is_set():
                return
            for daemon in self.daemons:
                process = daemon.process
                if process is not None and process.poll() is not None:
                    code = process.returncode
                    daemon.process = None
                    if now - daemon.started_at >= self.stable_s:
                        daemon.failures = 0
                    daemon.failures += 1
                    daemon.next_start = now + backoff_s(daemon.failures)
                    log.warning("MPS control daemon of %s exited with %s; restarting in %.0f s",
                                daemon.uuid, code, backoff_s(daemon.failures))  # fmt: skip
                if daemon.process is None and now >= daemon.next_start:
                    daemon.process = self._spawn(daemon.uuid)
                    daemon.started_at = now
            running = [d.uuid for d in self.daemons if d.process is not None]
            if len(running) == len(self.daemons):
                self._set_state(f"running on {len(running)} GPU(s)")
            else:
                down = sorted({d.uuid for d in self.daemons} - set(running))
                self._set_state(f"restarting for {', '.join(down)}")

    def _spawn(self, uuid: str) -> subprocess.Popen[bytes]:
        assert self.binary is not None
        env = daemon_env(self.root, uuid, dict(os.environ))
        log_file = pipe_dir(self.root, uuid) / "log" / "agent-daemon.out"
        with log_file.open("ab") as out:
            process = subprocess.Popen(
                [self.binary, "-f"], env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        log.info("MPS control daemon for %s: pid %d, pipes in %s", uuid, process.pid,
                 pipe_dir(self.root, uuid))  # fmt: skip
        return process

    def command(self, uuid: str, line: str, timeout_s: float = 5.0) -> str:
        """One command to a GPU's daemon (``get_server_list``, ...), as its own CLI sends it."""
        if self.binary is None:
            raise RuntimeError(self.state)
        env = daemon_env(self.root, uuid, dict(os.environ))
        done = subprocess.run([self.binary], input=f"{line}\n".encode(), env=env,
                              capture_output=True, timeout=timeout_s, check=False)  # fmt: skip
        return done.stdout.decode(errors="replace").strip()

    def close(self) -> None:
        """``quit`` each daemon (its servers exit once their clients are gone), then stop it."""
        with self._lock:
            self._stop.set()
            for daemon in self.daemons:
                process, daemon.process = daemon.process, None
                if process is None or process.poll() is not None:
                    continue
                try:
                    self.command(daemon.uuid, "quit")
                    process.wait(STOP_TIMEOUT_S)
                except (subprocess.TimeoutExpired, OSError, RuntimeError):
                    process.kill()
                    process.wait()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
