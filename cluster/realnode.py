"""One real worker node beside the kwok nodes: containerd, runc, the CNI bridge, a kubelet and
kube-proxy, so that the operator's pods really run Berth's images (on the CPU).

Everything the node touches is the project's own: the bridge ``berth-cni0`` carries the node's
address (the kubelet refuses loopback; the machine's own address is never used) and the pods,
in their own subnet, containerd keeps its content under Berth's cache
(imported images survive ``cluster down``) and its sockets under ``/run/berth``. A machine holds
one real node at a time (fixed interface names; a lock file says who holds it).

``HostSnapshot`` records what the kubelet, kube-proxy and the bridge plugin change on the host
(sysctls, iptables rules, paths) before the node starts; ``teardown`` removes every pod sandbox
through the CRI (``crictl rmp``: CNI DEL, network namespaces), stops the daemons, unmounts what is
left under the node's folders, removes its cgroups and interfaces and puts the snapshot back.
The settings that work on this kind of machine (cgroup v1, no AppArmor, no CAP_SYS_RESOURCE) are
in ``../shared/PLATFORM.md``: ``restrict_oom_score_adj``, ``disable_apparmor``, ``cgroupfs``,
``failCgroupV1: false``.
"""

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

import yaml

from berth.cluster.images import PAUSE_IMAGE, BuiltImage
from berth.cluster.pki import NODE_IP, Pki

NODE_NAME = "berth-node"
# The pods' bridge also holds NODE_IP: this VM's kernel has no dummy interfaces, and the bridge
# is the project's own. The CNI bridge plugin finds it and adds the pods' gateway address.
BRIDGE = "berth-cni0"
POD_CIDR = "10.251.0.0/24"
CGROUP_ROOT = "berth"  # the kubelet's cgroupRoot: /sys/fs/cgroup/<controller>/berth/...
RUN_DIR = Path("/run/berth")
# Berth's node agent (``berth node-agent``) serves its socket here; the runtime pods mount this
# folder (the operator's ``BERTH_AGENT_SOCKET_DIR``) and nothing else of RUN_DIR.
AGENT_DIR = RUN_DIR / "agent"
AGENT_SOCKET = AGENT_DIR / "agent.sock"
# The agent's NVIDIA MPS folder (``--mps-dir``; the operator's ``BERTH_MPS_HOST_DIR``): with no MPS
# binary here the agent makes it and says MPS is unavailable, and the runtime pods mount it and
# its shm as /dev/shm all the same, so the real node runs the pods as an MPS node would.
MPS_DIR = RUN_DIR / "mps"
# Only pods that tolerate this land on the real node: its GPUs are simulated and its pods run for
# real on the CPU, so the kwok-scale tests and services without the toleration stay off it.
TAINT_KEY = "berth.dev/simulated-gpu"
# What lands a pod on the real node (its label, its taint), as an InferenceService's spec.pod.
REAL_NODE_POD: dict[str, Any] = {"nodeSelector": {"type": "real"},
                 "tolerations": [{"key": TAINT_KEY, "operator": "Exists"}]}  # fmt: skip
TAINT = f"{TAINT_KEY}=true:NoSchedule"

CNI_BIN = Path("/usr/lib/cni")
# Host settings that the kubelet (overcommit, panic), the bridge plugin (forwarding) and
# kube-proxy may change; put back on teardown.
SYSCTLS = (
    "vm/overcommit_memory",
    "kernel/panic",
    "kernel/panic_on_oops",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/netfilter/nf_conntrack_max",
)
# Paths outside the node's folders that the daemons create if they are missing.
HOST_PATHS = ("/var/lib/cni", "/var/run/netns", "/etc/cni", "/opt/cni", "/var/lib/kubelet",
              "/var/log/pods", "/var/log/containers", "/etc/kubernetes")  # fmt: skip


class RealNodeError(RuntimeError):
    """The real node could not start or stop; the message says why and what to do."""


@dataclass(frozen=True)
class RealNodeShape:
    """What the real node advertises: a few simulated GPUs, so fractional services land here
    and run the runtime on the CPU with a budget that a CPU can hold."""

    gpus: int = 2
    gpu_product: str = "Berth-CPU-Simulated"
    gpu_memory_mib: int = 2048
    max_pods: int = 32


@dataclass
class HostSnapshot:
    sysctls: dict[str, str] = field(default_factory=dict)
    iptables: str = ""
    ip6tables: str = ""
    missing_paths: list[str] = field(default_factory=list)

    @classmethod
    def take(cls) -> "HostSnapshot":
        sysctls = {}
        for key in SYSCTLS:
            path = Path("/proc/sys") / key
            if path.exists():
                sysctls[key] = path.read_text().strip()
        return cls(
            sysctls=sysctls,
            iptables=_output(["iptables-save"]),
            ip6tables=_output(["ip6tables-save"]),
            missing_paths=[p for p in HOST_PATHS if not os.path.lexists(p)],
        )

    def restore(self) -> None:
        for key, value in self.sysctls.items():
            path = Path("/proc/sys") / key
            if path.exists() and path.read_text().strip() != value:
                path.write_text(value)
        for family, saved in (("iptables", self.iptables), ("ip6tables", self.ip6tables)):
            restore = _ruleset_to_restore(saved, _output([f"{family}-save"]))
            if restore:
                subprocess.run([f"{family}-restore"], input=restore, text=True,
                               capture_output=True, check=False)  # fmt: skip
        for missing in self.missing_paths:
            if os.path.lexists(missing) and not _mounts_under(Path(missing)):
                shutil.rmtree(missing, ignore_errors=True)

    def to_json(self) -> dict[str, Any]:
        return {"sysctls": self.sysctls, "iptables": self.iptables, "ip6tables": self.ip6tables,
                "missing_paths": self.missing_paths}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "HostSnapshot":
        return cls(**data)


@dataclass
class RealNode:
    """The real node's files and commands; ``LocalCluster`` starts and stops its processes."""

    state_dir: Path  # the cluster's state folder
    bin_dir: Path
    content_dir: Path  # containerd's root: images persist here between clusters
    shape: RealNodeShape = field(default_factory=RealNodeShape)

    @property
    def dir(self) -> Path:
        return self.state_dir / "node"

    @property
    def sock(self) -> Path:
        return RUN_DIR / "containerd.sock"

    @property
    def kubelet_root(self) -> Path:
        return self.dir / "kubelet"

    @property
    def lock_path(self) -> Path:
        return RUN_DIR / "real-node.lock"

    # ---- host set-up ---------------------------------------------------------------------

    def check_host(self) -> None:
        """Say plainly what is missing before anything is changed."""
        if os.geteuid() != 0:
            raise RealNodeError("the real node needs root (containerd, CNI, cgroups); "
                                "run as root or pass --no-real-node")  # fmt: skip
        missing = [
            t for t in ("containerd", "runc", "iptables", "ip", "conntrack") if not shutil.which(t)
        ]
        missing += [
            str(CNI_BIN / p)
            for p in ("bridge", "host-local", "loopback")
            if not (CNI_BIN / p).exists()
        ]
        missing += [
            b for b in ("kubelet", "kube-proxy", "crictl") if not (self.bin_dir / b).exists()
        ]
        if missing:
            raise RealNodeError(
                f"the real node needs {', '.join(missing)}: run `make system toolchain` "
                "(Debian packages containerd runc containernetworking-plugins iptables conntrack; "
                "kubelet, kube-proxy, crictl from cluster/build-k8s.sh) or pass --no-real-node"
            )

    def acquire(self) -> None:
        """Hold the machine's one real node (interface names and iptables are machine-wide)."""
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        self._lock = self.lock_path.open("a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            raise RealNodeError(
                f"another cluster holds this machine's real node ({self._lock.read().strip()}); "
                "stop it with `berth cluster down` or pass --no-real-node"
            ) from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"{self.state_dir} (pid {os.getpid()})")
        self._lock.flush()

    def release(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()
            del self._lock

    def prepare(self, pki: Pki, api_server: str, tokens: dict[str, str]) -> HostSnapshot:
        """Interface, configs and kubeconfigs; returns the host snapshot taken first."""
        snapshot = HostSnapshot.take()
        (self.dir / "snapshot.json").parent.mkdir(parents=True, exist_ok=True)
        (self.dir / "snapshot.json").write_text(json.dumps(snapshot.to_json()))
        _ip("link", "add", BRIDGE, "type", "bridge", ok_if="File exists")
        _ip(
            "addr", "add", f"{NODE_IP}/{POD_CIDR.split('/')[1]}", "dev", BRIDGE, ok_if="File exists"
        )
        _ip("link", "set", BRIDGE, "up")
        # The kubelet's cgroupRoot must exist in every v1 hierarchy (it makes kubepods below).
        for controller in Path("/sys/fs/cgroup").iterdir():
            if controller.is_dir() and not controller.is_symlink() and controller.name != "unified":
                (controller / CGROUP_ROOT).mkdir(exist_ok=True)
        for sub in ("cni/net.d", "cni/ipam", "containerd-state", "pod-logs", "kubelet"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.content_dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "cni/net.d/10-berth.conflist").write_text(
            json.dumps(self._cni_config(), indent=1)
        )
        (self.dir / "containerd.toml").write_text(self._containerd_config())
        (self.dir / "resolv.conf").write_text(
            "# pods of the local cluster resolve nothing outside it\n"
        )
        (self.dir / "kubelet.yaml").write_text(yaml.safe_dump(self._kubelet_config(pki)))
        self._kubeconfig("kubelet.kubeconfig", api_server, pki, tokens[f"system:node:{NODE_NAME}"])
        self._kubeconfig("kube-proxy.kubeconfig", api_server, pki, tokens["system:kube-proxy"])
        (self.dir / "crictl.yaml").write_text(
            yaml.safe_dump({"runtime-endpoint": f"unix://{self.sock}", "timeout": 30})
        )
        return snapshot

    def _cni_config(self) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": "berth",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,  # pods reach only the node and each other
                    "hairpinMode": True,  # a pod reaches itself through its Service
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.dir / "cni/ipam"),
                    },
                }
            ],
        }

    def _containerd_config(self) -> str:
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        return f"""version = 2
root = "{self.content_dir}"
state = "{self.dir / "containerd-state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  # This VM's root lacks CAP_SYS_RESOURCE and has no AppArmor (PLATFORM.md).
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  [{cri}.cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{self.dir / "cni/net.d"}"
    max_conf_num = 1
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
"""

    def _kubelet_config(self, pki: Pki) -> dict[str, Any]:
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 10248,
            "tlsCertFile": str(pki.kubelet_cert),
            "tlsPrivateKeyFile": str(pki.kubelet_key),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(pki.ca_cert)},
            },
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{CGROUP_ROOT}",
            "failCgroupV1": False,
            "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.sock}",
            "podLogsDir": str(self.dir / "pod-logs"),
            "resolvConf": str(self.dir / "resolv.conf"),
            "clusterDomain": "cluster.local",
            "maxPods": self.shape.max_pods,
            "serializeImagePulls": False,
            "registerNode": True,
            # Images are imported, never pulled: garbage collection must not delete them.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "200Mi",
                "nodefs.available": "2%",
                "imagefs.available": "2%",
            },
            "protectKernelDefaults": False,
            "makeIPTablesUtilChains": True,
            "staticPodPath": "",
            "shutdownGracePeriod": "0s",
            "volumePluginDir": str(self.dir / "volume-plugins"),
            "localStorageCapacityIsolation": True,
        }

    def _kubeconfig(self, name: str, server: str, pki: Pki, token: str) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "berth-local",
                          "cluster": {"server": server, "certificate-authority": str(pki.ca_cert)}}],
            "users": [{"name": "node", "user": {"token": token}}],
            "contexts": [{"name": "berth-local", "context": {"cluster": "berth-local", "user": "node"}}],
            "current-context": "berth-local",
        }  # fmt: skip
        path = self.dir / name
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)

    # ---- commands ------------------------------------------------------------------------

    def command(self, component: str, ports: dict[str, int]) -> list[str]:
        if component == "containerd":
            return ["containerd", "--config", str(self.dir / "containerd.toml")]
        if component == "kubelet":
            return [str(self.bin_dir / "kubelet"), f"--config={self.dir / 'kubelet.yaml'}",
                    f"--kubeconfig={self.dir / 'kubelet.kubeconfig'}",
                    f"--root-dir={self.kubelet_root}", f"--cert-dir={self.dir / 'kubelet-pki'}",
                    f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}",
                    f"--node-labels={','.join(f'{k}={v}' for k, v in self.node_labels().items())}",
                    f"--register-with-taints={TAINT}",
                    "--v=1"]  # fmt: skip
        if component == "node-agent":
            return self.agent_command(kubeconfig=self.state_dir / "kubeconfig")
        if component == "kube-proxy":
            return [str(self.bin_dir / "kube-proxy"), f"--kubeconfig={self.dir / 'kube-proxy.kubeconfig'}",
                    f"--hostname-override={NODE_NAME}", "--proxy-mode=iptables",
                    f"--cluster-cidr={POD_CIDR}", "--masquerade-all",
                    f"--healthz-bind-address=127.0.0.1:{ports['kube-proxy']}",
                    f"--metrics-bind-address=127.0.0.1:{ports['kube-proxy-metrics']}",
                    f"--nodeport-addresses={NODE_IP}/32", "--iptables-localhost-nodeports=false",
                    # 0 leaves the host's conntrack limits and timeouts as they are.
                    "--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0",
                    "--conntrack-tcp-timeout-close-wait=0", "--v=1"]  # fmt: skip
        raise ValueError(component)

    def agent_command(self, kubeconfig: Path) -> list[str]:
        """Berth's node agent over the node's simulated GPUs (the UUIDs the Node advertises),
        publishing them on the Node, posting events and standby annotations on its pods, and
        installing sandboxed pods' seccomp profiles into the kubelet's seccomp folder."""
        return [sys.executable, "-m", "berth", "node-agent", f"--socket={AGENT_SOCKET}",
                f"--simulate-gpus={self.simulated_gpus()}", f"--node-name={NODE_NAME}",
                f"--kubeconfig={kubeconfig}", f"--seccomp-dir={self.kubelet_root / 'seccomp'}",
                f"--mps-dir={MPS_DIR}"]  # fmt: skip

    def simulated_gpus(self) -> str:
        """The node's GPUs as ``berth node-agent --simulate-gpus`` takes them: the UUIDs and
        memory its Node advertises."""
        from berth.cluster.nodes import gpu_uuids

        return ",".join(
            f"{uuid}:{self.shape.gpu_memory_mib}Mi"
            for uuid in gpu_uuids(NODE_NAME, self.shape.gpus)
        )

    def agent_answers(self) -> bool:
        """The node agent serves its ledger on its socket."""
        from berth.runtime.server.agent_client import AgentClient, AgentError

        try:
            AgentClient(str(AGENT_SOCKET), timeout_s=1.0).ledger()
        except AgentError:
            return False
        return True

    def health_url(self, component: str, ports: dict[str, int]) -> str:
        return {
            "kubelet": "http://127.0.0.1:10248/healthz",
            "kube-proxy": f"http://127.0.0.1:{ports['kube-proxy']}/healthz",
        }[component]

    def node_labels(self) -> dict[str, str]:
        from berth import wire

        return {
            "type": "real",
            wire.NODE_GPU_PRODUCT: self.shape.gpu_product,
            wire.NODE_GPU_MEMORY_MIB: str(self.shape.gpu_memory_mib),
            wire.NODE_GPU_COUNT: str(self.shape.gpus),
        }

    def crictl(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(
            [str(self.bin_dir / "crictl"), "--config", str(self.dir / "crictl.yaml"), *args],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise RealNodeError(f"crictl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def _ctr_command(self, *args: str) -> list[str]:
        """``ctr`` against this node's containerd, in the CRI's namespace."""
        return ["ctr", "--address", str(self.sock), "--namespace", "k8s.io", *args]

    def ctr(self, *args: str) -> str:
        result = subprocess.run(
            self._ctr_command(*args), capture_output=True, text=True, timeout=900
        )
        if result.returncode != 0:
            raise RealNodeError(f"ctr {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def ctr_ok(self) -> bool:
        command = self._ctr_command("version")
        return subprocess.run(command, capture_output=True, timeout=10).returncode == 0

    def content_digests(self) -> frozenset[str]:
        return frozenset(
            line.split()[0] for line in self.ctr("content", "ls").splitlines()[1:] if line
        )

    def images(self) -> set[str]:
        return set(self.ctr("images", "list", "--quiet").split())

    def import_image(self, image: BuiltImage) -> bool:
        """Stream ``image`` into containerd unless it is there already; True if imported."""
        if image.name in self.images():
            return False
        command = self._ctr_command("images", "import", "-")
        with subprocess.Popen(command, stdin=subprocess.PIPE, stderr=subprocess.PIPE) as ctr:
            assert ctr.stdin is not None and ctr.stderr is not None
            try:
                image.write_archive(cast(BinaryIO, ctr.stdin), present=self.content_digests())
            except BrokenPipeError:
                pass
            finally:
                ctr.stdin.close()
            errors = ctr.stderr.read().decode(errors="replace").strip()
        if ctr.returncode != 0 or image.name not in self.images():
            raise RealNodeError(f"ctr images import of {image.name} failed: {errors}")
        return True

    # ---- teardown ------------------------------------------------------------------------

    def remove_pods(self) -> None:
        """Every pod sandbox through the CRI, so CNI releases addresses and network namespaces."""
        if self.sock.exists():
            self.crictl("rmp", "--all", "--force", check=False)

    def cleanup_host(self) -> None:
        """After the daemons stopped: mounts, cgroups, interfaces, then the host snapshot."""
        for mount in sorted(
            _mounts_under(self.dir) + _mounts_under(self.content_dir), reverse=True
        ):
            subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
        for controller in Path("/sys/fs/cgroup").iterdir():
            root = controller / CGROUP_ROOT
            if root.is_dir():
                for cgroup in sorted(
                    (p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
                ):
                    with contextlib.suppress(OSError):
                        cgroup.rmdir()
                with contextlib.suppress(OSError):
                    root.rmdir()
        _ip("link", "del", BRIDGE, ok_if="Cannot find device")
        snapshot_file = self.dir / "snapshot.json"
        if snapshot_file.exists():
            HostSnapshot.from_json(json.loads(snapshot_file.read_text())).restore()
            snapshot_file.unlink()
        for stale in (self.sock, Path(f"{self.sock}.ttrpc")):
            stale.unlink(missing_ok=True)
        shutil.rmtree(AGENT_DIR, ignore_errors=True)  # the agent's socket and its tenants file
        shutil.rmtree(MPS_DIR, ignore_errors=True)  # its MPS folder and the pods' shared shm
        # The agent's egress enforcer pins its maps and links in bpffs so that they outlive it;
        # unpinned, the kernel frees them (the pods' cgroups are gone already).
        shutil.rmtree(_egress_pins(), ignore_errors=True)
        with contextlib.suppress(OSError):
            _egress_pins().parent.rmdir()
        self.release()


def unavailable_reason() -> str | None:
    """Why this machine cannot start a real node now (None if it can)."""
    if os.geteuid() != 0:
        return "the real node needs root"
    lock = RUN_DIR / "real-node.lock"
    if lock.exists():
        with lock.open("a+") as held:
            try:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.seek(0)
                return f"another cluster holds this machine's real node ({held.read().strip()})"
            fcntl.flock(held, fcntl.LOCK_UN)
    return None


def _egress_pins() -> Path:
    """Where the node agent's egress enforcer pins its maps and links (in bpffs)."""
    from berth.runtime.agent.egress import PIN_DIR

    return PIN_DIR


def leftovers(node: RealNode) -> list[str]:
    """What a stopped real node left on the host (empty when teardown was complete)."""
    found = [f"mount {m}" for m in _mounts_under(node.dir) + _mounts_under(node.content_dir)]
    found += [f"cgroup {c}" for c in Path("/sys/fs/cgroup").glob(f"*/{CGROUP_ROOT}")]
    links = _output(["ip", "-o", "link", "show"])
    found += [f"link {BRIDGE}"] if f" {BRIDGE}:" in links else []
    found += [f"process {pid}: {cmd}" for pid, cmd in _processes_using(str(node.sock))]
    found += [f"process {pid}: {cmd}" for pid, cmd in _processes_using(str(AGENT_SOCKET))]
    found += [f"path {AGENT_DIR}"] if AGENT_DIR.exists() else []
    found += [f"path {MPS_DIR}"] if MPS_DIR.exists() else []
    found += [f"path {_egress_pins()}"] if _egress_pins().exists() else []
    found += (
        [f"netns {n.name}" for n in Path("/var/run/netns").glob("cni-*")]
        if Path("/var/run/netns").exists()
        else []
    )
    return found


def _tables(ruleset: str) -> set[str]:
    return {line[1:].strip() for line in ruleset.splitlines() if line.startswith("*")}


def _ruleset_to_restore(saved: str, now: str) -> str:
    """``iptables-restore`` input that brings back ``saved``: tables that exist now but did not
    then are restored empty (which drops their rules and user chains, kube-proxy's included)."""
    extra = sorted(_tables(now) - _tables(saved))
    return saved + "".join(f"*{table}\nCOMMIT\n" for table in extra)


def _processes_using(needle: str) -> list[tuple[int, str]]:
    """Processes whose command line names ``needle`` (containerd, its shims, the kubelet)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if needle in cmd:
                found.append((int(proc.name), cmd.strip()[:120]))
    return found


def _mounts_under(folder: Path) -> list[str]:
    prefix = str(folder.resolve()) if folder.exists() else str(folder)
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            mounts.append(point)
    return mounts


def _ip(*args: str, ok_if: str = "") -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0 and not (ok_if and ok_if in result.stderr):
        raise RealNodeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


def _output(command: list[str]) -> str:
    if not shutil.which(command[0]):
        return ""
    return subprocess.run(command, capture_output=True, text=True, check=False).stdout


def wait_for(predicate: Any, deadline: float, what: str, interval: float = 0.25) -> None:
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise RealNodeError(f"timed out waiting for {what}")
