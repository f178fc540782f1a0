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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

import yaml

from berth import wire
from berth.cluster import images
from berth.cluster.kwok_stages import pod_stages
from berth.cluster.nodes import gpu_uuids, node_manifests
from berth.cluster.pki import NODE_IP, Pki, make_pki
from berth.cluster.realnode import NODE_NAME, RealNode, wait_for
from berth.cluster.toolchain import ensure_binaries
from berth.operator.inventory import DEFAULT_INVENTORY, Inventory

# Order matters: each starts after the one before is healthy, and they stop in reverse.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
# The real node, after the rest; its node agent last (it publishes on the registered Node).
NODE_COMPONENTS = ("containerd", "kubelet", "kube-proxy", "node-agent")
SERVICE_CIDR = "10.96.0.0/16"
_PR_SET_PDEATHSIG = 1


class SavedState(TypedDict, total=False):
    """``state.json``: what another process needs to find and stop a running cluster."""

    pids: dict[str, int]
    ports: dict[str, int]
    bin_dir: str
    real_node: bool
    images: dict[str, str]


class ClusterError(RuntimeError):
    """The control plane could not start or stop; the message says why and what to do."""


IMAGES = (images.RUNTIME, images.OPERATOR)


def content_dir() -> Path:
    """containerd's root on the real node, kept between clusters so imports are paid once."""
    return images.cache_dir().parent / "containerd"


def default_state_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(os.environ.get("BERTH_CLUSTER_DIR", f"{cache}/berth/cluster"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_in_use(port: int, address: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        return s.connect_ex((address, port)) == 0


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
    # A real kubelet node beside the kwok nodes, running Berth's images (needs root).
    real_node: bool = False
    say: Callable[[str], None] = lambda _: None  # progress of the slow first steps
    pids: dict[str, int] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    images: dict[str, str] = field(default_factory=dict)  # "runtime" -> its image name
    node: RealNode | None = None

    @property
    def components(self) -> tuple[str, ...]:
        return COMPONENTS + (NODE_COMPONENTS if self.real_node else ())

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def server(self) -> str:
        return f"https://{self.api_address}:{self.ports['kube-apiserver']}"

    @property
    def api_address(self) -> str:
        """Loopback; with the real node, the node's own address on the pods' bridge, so that
        pods (the operator as the chart's pod) reach the API server through the `kubernetes`
        Service. Never the machine's own network address."""
        return NODE_IP if self.real_node else "127.0.0.1"

    # ---- lifecycle ---------------------------------------------------------------------------

    def up(self, timeout: float = 60.0) -> "LocalCluster":
        """Start every component; ``timeout`` bounds the start-up, not the images' first build
        and import (minutes on a fresh machine, said through ``say``)."""
        if self._running_pids():
            raise ClusterError(
                f"a cluster is already running from {self.state_dir} "
                f"(pids {self._running_pids()}); stop it with `berth cluster down`"
            )
        self.bin_dir = self.bin_dir or ensure_binaries()
        if self.real_node:
            self._prepare_real_node()
        started = time.monotonic()
        if self.api_port and port_in_use(self.api_port, self.api_address):
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
            "kube-proxy": free_port(),
            "kube-proxy-metrics": free_port(),
        }
        self._write_kubeconfigs(pki)
        if self.pod_ready_delay_s:
            (self.state_dir / "kwok.yaml").write_text(pod_stages(self.pod_ready_delay_s))
        try:
            if self.node is not None:
                self.node.prepare(pki, self.server, pki.tokens)
            for component in self.components:
                self._start(component, pki)
                self._wait_healthy(component, pki, deadline=started + timeout)
                if component == "containerd":
                    started += self._import_images()
            self._create_nodes()
            if self.node is not None:
                self._advertise_gpus(deadline=started + timeout)
            self._wait_nodes_ready(deadline=started + timeout)
        except BaseException:
            self.down()
            raise
        return self

    def down(self, timeout: float = 20.0) -> None:
        """Stop every component in reverse order; SIGKILL whatever outlives the deadline."""
        state = self._load_state()
        self.pids = self.pids or state.get("pids", {})
        if self.node is None and state.get("real_node"):
            self.real_node = True
            self.node = self._real_node(Path(state["bin_dir"]))
        for component in reversed(self.components):
            if component == "containerd" and self.node is not None:
                # Sandboxes go through the CRI while containerd still runs: CNI DEL releases
                # each pod's address and network namespace.
                self.node.remove_pods()
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
        if self.node is not None:
            self.node.cleanup_host()
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

    def helm(self, *args: str, check: bool = True, timeout: float = 120.0) -> str:
        return self._run("helm", args, input=None, check=check, timeout=timeout)

    @contextlib.contextmanager
    def node_agent_handed_over(self, timeout: float = 60.0) -> Iterator[None]:
        """The real node without its host-process node agent, while another one (the Helm
        chart's DaemonSet) serves the node's socket; afterwards, once that one has let the socket
        go, the host agent starts again and the node's runtimes re-register with it."""
        assert self.node is not None, "no real node"
        node = self.node
        pid = self.pids.pop("node-agent", None)
        if pid is not None and process_alive(pid):
            os.killpg(pid, signal.SIGTERM)
            wait_for(lambda: not process_alive(pid), time.monotonic() + 20, "the host node agent")
            _reap(pid)
        self._save_state()
        try:
            yield
        finally:
            deadline = time.monotonic() + timeout
            wait_for(lambda: not node.agent_answers(), deadline, "the node's socket to be let go")
            command = node.agent_command(kubeconfig=self.state_dir / "kubeconfig")
            self._spawn("node-agent", command, append=True)
            started = self.pids["node-agent"]

            def serves() -> bool:
                if not process_alive(started):
                    raise ClusterError(self._exited_message("node-agent"))
                return node.agent_answers()

            wait_for(serves, deadline, f"the node agent (see {self.logs / 'node-agent.log'})")

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
            for c in self.components
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
        cluster.real_node, cluster.images = state.get("real_node", False), state.get("images", {})
        if cluster.real_node:
            cluster.node = cluster._real_node(cluster.bin_dir)
        return cluster

    # ---- internals -------------------------------------------------------------------------

    def _run(
        self,
        tool: str,
        args: Sequence[str],
        input: str | None,
        check: bool,
        timeout: float = 120.0,
    ) -> str:
        assert self.bin_dir is not None
        result = subprocess.run(
            [str(self.bin_dir / tool), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise ClusterError(f"{tool} {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    # ---- the real node -----------------------------------------------------------------------

    def _real_node(self, bin_dir: Path) -> RealNode:
        return RealNode(state_dir=self.state_dir, bin_dir=bin_dir, content_dir=content_dir())

    def _prepare_real_node(self) -> None:
        """Check the host and build the images before anything starts (the slow first step)."""
        assert self.bin_dir is not None
        self.node = self._real_node(self.bin_dir)
        self.node.check_host()
        self.node.acquire()
        try:
            built = [images.build_pause(self.say), *(images.build(s, self.say) for s in IMAGES)]
        except BaseException:
            self.node.release()
            raise
        self._built = built
        self.images = {"pause": built[0].name} | {
            s.short: b.name for s, b in zip(IMAGES, built[1:], strict=True)
        }

    def _import_images(self) -> float:
        """Import what containerd lacks; returns the seconds it took."""
        assert self.node is not None
        began = time.monotonic()
        for image in self._built:
            if image.name not in self.node.images():
                size = image.size_bytes / 2**20
                self.say(f"importing {image.name} ({size:.0f} MiB) into containerd")
                self.node.import_image(image)
        current = {image.name for image in self._built}
        stale = [i for i in self.node.images() if i.startswith("berth.local/") and i not in current]
        if stale:  # older builds of Berth's images: containerd frees their layers
            self.node.ctr("images", "remove", *stale)
        self._save_state()
        return time.monotonic() - began

    def _advertise_gpus(self, deadline: float) -> None:
        """The real node's simulated GPUs: capacity (as a device plugin would report it) and the
        UUID annotation the node agent publishes on GPU nodes."""
        assert self.node is not None
        wait_for(lambda: self.kubectl("get", "node", NODE_NAME, check=False) != "", deadline,
                 f"the kubelet to register node {NODE_NAME} (see {self.logs / 'kubelet.log'})")  # fmt: skip
        shape = self.node.shape
        patch = {"status": {"capacity": {wire.GPU_RESOURCE: str(shape.gpus)}}}
        self.kubectl("patch", "node", NODE_NAME, "--subresource=status", "--type=merge",
                     "-p", json.dumps(patch))  # fmt: skip
        uuids = ",".join(gpu_uuids(NODE_NAME, shape.gpus))
        self.kubectl("annotate", "--overwrite", "node", NODE_NAME, f"{wire.NODE_GPU_UUIDS}={uuids}")

    def _command(self, component: str, pki: Pki) -> list[str]:
        assert self.bin_dir is not None
        if component in NODE_COMPONENTS:
            assert self.node is not None
            return self.node.command(component, self.ports)
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
                    f"--bind-address={self.api_address}", f"--advertise-address={self.api_address}",
                    f"--secure-port={p['kube-apiserver']}",
                    f"--tls-cert-file={pki.serving_cert}", f"--tls-private-key-file={pki.serving_key}",
                    f"--client-ca-file={pki.ca_cert}",
                    f"--token-auth-file={pki.token_file}",
                    "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                    f"--service-account-key-file={pki.service_account_pub}",
                    f"--service-account-signing-key-file={pki.service_account_key}",
                    f"--service-cluster-ip-range={SERVICE_CIDR}", "--allow-privileged=true",
                    "--profiling=false", "--max-requests-inflight=2000",
                    "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
                    # The real node: the Node authorizer for its kubelet, and how the API
                    # server reaches kubelets for logs and exec.
                    "--authorization-mode=Node,RBAC",
                    f"--kubelet-client-certificate={pki.kubelet_client_cert}",
                    f"--kubelet-client-key={pki.kubelet_client_key}",
                    f"--kubelet-certificate-authority={pki.ca_cert}",
                    "--kubelet-preferred-address-types=InternalIP,Hostname",
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
        self._spawn(component, self._command(component, pki))

    def _spawn(self, component: str, command: list[str], append: bool = False) -> None:
        log = (self.logs / f"{component}.log").open("a" if append else "w")
        process = subprocess.Popen(
            command,
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
        if component == "containerd":
            assert self.node is not None
            node = self.node

            def answers() -> bool:
                if not process_alive(pid):
                    raise ClusterError(self._exited_message(component))
                return node.sock.exists() and node.ctr_ok()

            return wait_for(answers, deadline, f"containerd (see {self.logs / 'containerd.log'})")
        if component == "node-agent":
            assert self.node is not None
            agent = self.node

            def serves() -> bool:
                if not process_alive(pid):
                    raise ClusterError(self._exited_message(component))
                return agent.agent_answers()

            return wait_for(
                serves, deadline, f"the node agent (see {self.logs / 'node-agent.log'})"
            )
        if component in NODE_COMPONENTS:
            assert self.node is not None
            url = self.node.health_url(component, self.ports)
            return self._poll(component, url, ssl._create_unverified_context(), pki, deadline)
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
        self._poll(component, url, context, pki, deadline)

    def _poll(
        self, component: str, url: str, context: ssl.SSLContext, pki: Pki, deadline: float
    ) -> None:
        pid = self.pids[component]
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
                            "server": self.server,
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
        state = {"pids": self.pids, "ports": self.ports, "bin_dir": str(self.bin_dir),
                 "real_node": self.real_node, "images": self.images}  # fmt: skip
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
