"""A real Kubernetes control plane on 127.0.0.1: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok (simulated GPU nodes), all from the binaries that cluster/build-k8s.sh builds.

``LocalCluster.up()`` writes certificates, a token file and a kubeconfig under one state folder,
starts the components in order, waits for each to be healthy and creates the inventory's nodes.
``down()`` stops them in reverse order (kube-apiserver hangs on SIGTERM once etcd is gone), with a
deadline and SIGKILL after it, and checks that no process and no listening port is left. The
state folder keeps each component's log for debugging and the process ids, so ``berth cluster
down`` from another shell stops a cluster that ``berth cluster up`` left running.
"""

import contextlib
import ctypes
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

import yaml

from berth.cluster.kwok_stages import pod_stages
from berth.cluster.nodes import node_manifests
from berth.cluster.pki import Pki, make_pki
from berth.cluster.toolchain import ensure_binaries
from berth.operator.inventory import DEFAULT_INVENTORY, Inventory

# Order matters: each starts after the one before is healthy, and they stop in reverse.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
SERVICE_CIDR = "10.96.0.0/16"
_PR_SET_PDEATHSIG = 1


class SavedState(TypedDict, total=False):
    """``state.json``: what another process needs to find and stop a running cluster."""

    pids: dict[str, int]
    ports: dict[str, int]
    bin_dir: str


class ClusterError(RuntimeError):
    """The control plane could not start or stop; the message says why and what to do."""


def default_state_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(os.environ.get("BERTH_CLUSTER_DIR", f"{cache}/berth/cluster"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def die_with_parent() -> None:
    """``preexec_fn`` for a child that must not outlive this process, even if it is SIGKILLed:
    the kernel sends the child SIGKILL when its parent dies (runs between fork and exec)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class LocalCluster:
    """One loopback control plane. ``api_port`` 0 picks a free port."""

    state_dir: Path = field(default_factory=default_state_dir)
    inventory: Inventory = field(default_factory=lambda: DEFAULT_INVENTORY)
    api_port: int = 0
    bin_dir: Path | None = None
    # With attach=True (tests), components die with this process even if it is SIGKILLed.
    attach: bool = True
    # Seconds between a pod's bind and kwok marking it Running and Ready (0: kwok's instant
    # default); a model server loads its weights in between (see kwok_stages).
    pod_ready_delay_s: float = 0.0
    pids: dict[str, int] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['kube-apiserver']}"

    # ---- lifecycle ---------------------------------------------------------------------------

    def up(self, timeout: float = 60.0) -> "LocalCluster":
        started = time.monotonic()
        if self._running_pids():
            raise ClusterError(
                f"a cluster is already running from {self.state_dir} "
                f"(pids {self._running_pids()}); stop it with `berth cluster down`"
            )
        self.bin_dir = self.bin_dir or ensure_binaries()
        if self.api_port and port_in_use(self.api_port):
            raise ClusterError(
                f"port {self.api_port} on 127.0.0.1 is already in use; stop what listens there "
                "or pick another with --port (0 picks a free one)"
            )
        self.logs.mkdir(parents=True, exist_ok=True)
        for stale in ("etcd-data", "kwok"):
            subprocess.run(["rm", "-rf", str(self.state_dir / stale)], check=True)
        pki = make_pki(self.state_dir / "pki")
        self.ports = {
            "etcd": free_port(),
            "etcd-peer": free_port(),
            "kube-apiserver": self.api_port or free_port(),
            "kube-controller-manager": free_port(),
            "kube-scheduler": free_port(),
            "kwok": free_port(),
        }
        self._write_kubeconfigs(pki)
        if self.pod_ready_delay_s:
            (self.state_dir / "kwok.yaml").write_text(pod_stages(self.pod_ready_delay_s))
        try:
            for component in COMPONENTS:
                self._start(component, pki)
                self._wait_healthy(component, pki, deadline=started + timeout)
            self._create_nodes()
            self._wait_nodes_ready(deadline=started + timeout)
        except BaseException:
            self.down()
            raise
        return self

    def down(self, timeout: float = 20.0) -> None:
        """Stop every component in reverse order; SIGKILL whatever outlives the deadline."""
        self.pids = self.pids or self._load_state().get("pids", {})
        for component in reversed(COMPONENTS):
            pid = self.pids.get(component)
            if pid is None or not process_alive(pid):
                continue
            os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout / len(COMPONENTS)
            while process_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if process_alive(pid):
                os.killpg(pid, signal.SIGKILL)
            _reap(pid)
        left = self._running_pids()
        if left:
            raise ClusterError(f"processes {left} survived SIGKILL; check `ps -p`")
        self.pids = {}
        (self.state_dir / "state.json").unlink(missing_ok=True)

    def __enter__(self) -> "LocalCluster":
        return self.up()

    def __exit__(self, *_: object) -> None:
        self.down()

    # ---- use -------------------------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        """Run the built kubectl against this cluster; raise with its stderr on failure."""
        return self._run("kubectl", args, input=input, check=check)

    def helm(self, *args: str, check: bool = True) -> str:
        return self._run("helm", args, input=None, check=check)

    def env(self) -> dict[str, str]:
        """Environment for a child process (an operator, a test tool) that talks to the cluster."""
        assert self.bin_dir is not None
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{self.bin_dir}:{os.environ.get('PATH', '')}",
        }

    def status(self) -> dict[str, str]:
        """component -> 'running (pid N)' or 'stopped'."""
        pids = self.pids or self._load_state().get("pids", {})
        return {
            c: f"running (pid {pids[c]})" if c in pids and process_alive(pids[c]) else "stopped"
            for c in COMPONENTS
        }

    @classmethod
    def attach_existing(cls, state_dir: Path | None = None) -> "LocalCluster":
        """The cluster that ``berth cluster up`` left running in ``state_dir``."""
        cluster = cls(state_dir=state_dir or default_state_dir())
        state = cluster._load_state()
        if not state:
            raise ClusterError(f"no cluster state in {cluster.state_dir}; run `berth cluster up`")
        cluster.pids, cluster.ports = state.get("pids", {}), state.get("ports", {})
        cluster.bin_dir = Path(state["bin_dir"])
        return cluster

    # ---- internals -------------------------------------------------------------------------

    def _run(self, tool: str, args: Sequence[str], input: str | None, check: bool) -> str:
        assert self.bin_dir is not None
        result = subprocess.run(
            [str(self.bin_dir / tool), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise ClusterError(f"{tool} {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def _command(self, component: str, pki: Pki) -> list[str]:
        assert self.bin_dir is not None
        p, s = self.ports, self.state_dir
        binary = str(self.bin_dir / component)
        if component == "etcd":
            return [binary, "--name=berth", f"--data-dir={s / 'etcd-data'}",
                    f"--listen-client-urls=http://127.0.0.1:{p['etcd']}",
                    f"--advertise-client-urls=http://127.0.0.1:{p['etcd']}",
                    f"--listen-peer-urls=http://127.0.0.1:{p['etcd-peer']}",
                    f"--initial-advertise-peer-urls=http://127.0.0.1:{p['etcd-peer']}",
                    f"--initial-cluster=berth=http://127.0.0.1:{p['etcd-peer']}",
                    "--unsafe-no-fsync", "--quota-backend-bytes=4294967296"]  # fmt: skip
        if component == "kube-apiserver":
            return [binary, f"--etcd-servers=http://127.0.0.1:{p['etcd']}",
                    "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
                    f"--secure-port={p['kube-apiserver']}",
                    f"--tls-cert-file={pki.serving_cert}", f"--tls-private-key-file={pki.serving_key}",
                    f"--client-ca-file={pki.ca_cert}",
                    f"--token-auth-file={pki.token_file}", "--authorization-mode=RBAC",
                    "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                    f"--service-account-key-file={pki.service_account_pub}",
                    f"--service-account-signing-key-file={pki.service_account_key}",
                    f"--service-cluster-ip-range={SERVICE_CIDR}", "--allow-privileged=true",
                    "--profiling=false", "--max-requests-inflight=2000", "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
                    "--max-mutating-requests-inflight=1000"]  # fmt: skip
        if component in ("kube-controller-manager", "kube-scheduler"):
            kubeconfig = s / f"{component}.kubeconfig"
            command = [binary, f"--kubeconfig={kubeconfig}",
                       f"--authentication-kubeconfig={kubeconfig}",
                       f"--authorization-kubeconfig={kubeconfig}", "--leader-elect=false",
                       "--bind-address=127.0.0.1", f"--secure-port={p[component]}",
                       "--kube-api-qps=500", "--kube-api-burst=1000"]  # fmt: skip
            if component == "kube-controller-manager":
                command += [f"--service-account-private-key-file={pki.service_account_key}",
                            f"--root-ca-file={pki.ca_cert}", "--use-service-account-credentials",
                            f"--service-cluster-ip-range={SERVICE_CIDR}",
                            "--controllers=*,-nodeipam,-cloud-node-lifecycle"]  # fmt: skip
            return command
        kwok = [binary, f"--kubeconfig={s / 'kwok.kubeconfig'}", "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                "--node-ip=127.0.0.1", "--node-lease-duration-seconds=40",
                f"--server-address=127.0.0.1:{p['kwok']}", "--cidr=10.244.0.0/16"]  # fmt: skip
        return kwok + ([f"--config={s / 'kwok.yaml'}"] if self.pod_ready_delay_s else [])

    def _start(self, component: str, pki: Pki) -> None:
        log = (self.logs / f"{component}.log").open("w")
        process = subprocess.Popen(
            self._command(component, pki),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.state_dir,
            start_new_session=True,
            preexec_fn=die_with_parent if self.attach else None,
        )
        self.pids[component] = process.pid
        self._save_state()

    def _wait_healthy(self, component: str, pki: Pki, deadline: float) -> None:
        pid = self.pids[component]
        url = {
            "etcd": f"http://127.0.0.1:{self.ports['etcd']}/health",
            "kube-apiserver": f"{self.server}/readyz",
            "kube-controller-manager": f"https://127.0.0.1:{self.ports[component]}/healthz",
            "kube-scheduler": f"https://127.0.0.1:{self.ports[component]}/healthz",
            "kwok": f"http://127.0.0.1:{self.ports['kwok']}/healthz",
        }[component]
        if component == "kube-apiserver":
            context = ssl.create_default_context(cafile=str(pki.ca_cert))
        else:  # these serve self-signed certificates of their own
            context = ssl._create_unverified_context()
        request = urllib.request.Request(
            url, headers={"Authorization": f"Bearer {pki.tokens['berth-admin']}"}
        )
        last_error = ""
        while time.monotonic() < deadline:
            if not process_alive(pid):
                raise ClusterError(self._exited_message(component))
            try:
                with urllib.request.urlopen(request, timeout=2, context=context) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError) as error:
                last_error = str(error)
            time.sleep(0.2)
        raise ClusterError(
            f"{component} was not healthy at {url} in time ({last_error}); "
            f"see {self.logs / (component + '.log')}"
        )

    def _exited_message(self, component: str) -> str:
        log = self.logs / f"{component}.log"
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        hint = ""
        if "address already in use" in tail:
            hint = " (a port it needs is taken: stop the other process or choose another port)"
        return f"{component} exited during start-up{hint}; last lines of {log}:\n{tail}"

    def _write_kubeconfigs(self, pki: Pki) -> None:
        users = {
            "kubeconfig": "berth-admin",
            "kube-controller-manager.kubeconfig": "system:kube-controller-manager",
            "kube-scheduler.kubeconfig": "system:kube-scheduler",
            "kwok.kubeconfig": "system:kwok",
        }
        for filename, user in users.items():
            config = {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "berth-local",
                        "cluster": {
                            "server": f"https://127.0.0.1:{self.ports['kube-apiserver']}",
                            "certificate-authority": str(pki.ca_cert),
                        },
                    }
                ],
                "users": [{"name": user, "user": {"token": pki.tokens[user]}}],
                "contexts": [
                    {"name": "berth-local", "context": {"cluster": "berth-local", "user": user}}
                ],
                "current-context": "berth-local",
            }
            path = self.state_dir / filename
            path.write_text(yaml.safe_dump(config))
            path.chmod(0o600)

    def _create_nodes(self) -> None:
        manifests = node_manifests(self.inventory)
        self.kubectl("create", "-f", "-", input=yaml.safe_dump_all(manifests))

    def _wait_nodes_ready(self, deadline: float) -> None:
        remaining = max(1, int(deadline - time.monotonic()))
        self.kubectl("wait", "--for=condition=Ready", "node", "--all", f"--timeout={remaining}s")

    def _save_state(self) -> None:
        state = {"pids": self.pids, "ports": self.ports, "bin_dir": str(self.bin_dir)}
        (self.state_dir / "state.json").write_text(json.dumps(state))

    def _load_state(self) -> "SavedState":
        path = self.state_dir / "state.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _running_pids(self) -> list[int]:
        pids = self.pids or self._load_state().get("pids", {})
        return [pid for pid in pids.values() if process_alive(pid)]


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone once reaped.
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        return reaped == 0
    except ChildProcessError:
        return _not_zombie(pid)


def _not_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
