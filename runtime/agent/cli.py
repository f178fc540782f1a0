"""``berth node-agent``: one per node; arbitrates each GPU's memory between its runtimes.

Every flag can also come from an environment variable (the DaemonSet sets them). Without a GPU
(CI, a laptop) ``--simulate-gpus`` describes the GPUs, and the real agent runs all the same.
With ``--node-name`` it also watches the Berth pods bound to its node, installs sandboxed pods'
seccomp profiles into the kubelet's ``--seccomp-dir`` (``pod_watch``, ``seccomp_sync``) and, as
root on a kernel with cgroup BPF, holds their egress to their allowlists (``pod_egress``; where
the enforcer cannot load, the agent says so and runs without it).
"""

import ipaddress
import logging
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import click
from pydantic import BaseModel, ConfigDict, Field

from berth import agent_protocol
from berth.runtime.agent import gpus as gpu_discovery
from berth.runtime.agent.ledger import GpuMemory, LeasePolicy, NodeLedger
from berth.runtime.agent.seccomp_sync import KUBELET_SECCOMP_DIR

if TYPE_CHECKING:
    from berth.runtime.agent.pod_egress import PodEgress

log = logging.getLogger("berth.node_agent")


class AgentSettings(BaseModel):
    """The agent's settings, read once at start-up from flags and env."""

    model_config = ConfigDict(frozen=True)

    socket: Path
    state_file: Path  # who holds a lease; on the host's tmpfs, beside the socket
    simulate_gpus: str | None = None
    reserve_bytes: int = Field(0, ge=0)
    policy: LeasePolicy
    node_name: str | None = None
    kubeconfig: Path | None = None
    seccomp_dir: Path = KUBELET_SECCOMP_DIR
    egress: bool = True
    cluster_dns: tuple[str, ...] = ()
    metrics_port: int = Field(0, ge=0, le=65535)  # 0: /metrics on the unix socket only
    mps_dir: Path | None = None  # run an MPS control daemon per GPU, pipes under it
    log_level: str = "info"


def _quantity(_: click.Context, param: click.Parameter, value: str) -> int:
    from berth.operator.api import quantity_bytes

    try:
        return quantity_bytes(value)
    except ValueError as error:
        raise click.BadParameter(f"{value!r} is not a memory quantity (e.g. 2Gi)") from error


def _addresses(_: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    found = tuple(a.strip() for a in value.split(",") if a.strip())
    for address in found:
        try:
            ipaddress.ip_address(address)
        except ValueError as error:
            raise click.BadParameter(f"{address!r} is not an IP address") from error
    return found


def _refuse_if_served(path: Path) -> None:
    """Two agents on one socket would each hand out the same memory: refuse to start."""
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return  # a stale socket of a dead agent; the server replaces it
    finally:
        probe.close()
    raise click.ClickException(f"another node agent is already serving on {path}")


def discover(settings: AgentSettings) -> list[GpuMemory]:
    try:
        if settings.simulate_gpus:
            node = settings.node_name or socket.gethostname()
            return gpu_discovery.simulated(settings.simulate_gpus, node, settings.reserve_bytes)
        return gpu_discovery.nvml(settings.reserve_bytes)
    except gpu_discovery.GpuDiscoveryError as error:
        raise click.ClickException(str(error)) from error


def egress_enforcement(
    settings: AgentSettings, report: Callable[[str, str, str], None] | None
) -> "PodEgress | None":
    """The eBPF egress enforcer over this node's sandboxed pods, or None (off, or it cannot load
    here: logged, since sandboxed pods' host names are then held by nothing on this node)."""
    if not settings.egress:
        return None
    from berth.runtime.agent.egress import EgressEnforcer, EgressError
    from berth.runtime.agent.pod_egress import PodEgress

    try:
        enforcer = EgressEnforcer()
    except (EgressError, OSError) as error:
        log.warning("no egress enforcer on this node (%s): sandboxed pods' egress is held by "
                    "their NetworkPolicy alone", error)  # fmt: skip
        return None
    return PodEgress(enforcer, settings.cluster_dns, report)


def _exit_cleanly(signum: int, _: object) -> None:
    raise SystemExit(0)


def run(settings: AgentSettings) -> None:
    import uvicorn

    from berth.runtime.agent.node import NodePublisher
    from berth.runtime.agent.pod_watch import PodWatch
    from berth.runtime.agent.seccomp_sync import SeccompProfiles
    from berth.runtime.agent.server import Agent, create_app, read_state

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    gpus = discover(settings)
    _refuse_if_served(settings.socket)
    settings.socket.parent.mkdir(parents=True, exist_ok=True)
    settings.state_file.parent.mkdir(parents=True, exist_ok=True)
    epoch = secrets.token_hex(8)
    known = read_state(settings.state_file)
    ledger = NodeLedger.start(gpus, epoch, settings.policy, time.monotonic(), known)
    publisher = pods = egress = None
    stop = threading.Event()
    if settings.node_name:
        from berth.operator.kube import KubeClient

        client = KubeClient.from_config(settings.kubeconfig, pool=3)  # publisher, pod watch, spare
        publisher = NodePublisher(client, settings.node_name, gpus)
        on_seen, on_gone = [SeccompProfiles(settings.seccomp_dir).pod_seen], []
        egress = egress_enforcement(settings, publisher.report)
        if egress is not None:
            on_seen.append(egress.pod_seen)
            on_gone.append(egress.pod_gone)
            threading.Thread(target=egress.run, args=(stop,), name="egress", daemon=True).start()
        pods = PodWatch(client, settings.node_name, on_seen=on_seen, on_gone=on_gone,
                        on_listed=[egress.listed] if egress is not None else [])  # fmt: skip
        pods.start()
    driver_free = None
    if not settings.simulate_gpus:  # a real GPU: wake grants wait until the driver has it back
        try:
            driver_free = gpu_discovery.DriverFree([gpu.uuid for gpu in gpus])
        except gpu_discovery.GpuDiscoveryError as error:
            log.warning("waking tenants are granted by the ledger alone: %s", error)
    agent = Agent(
        ledger,
        report=publisher.report if publisher else None,
        state_file=settings.state_file,
        annotate=publisher.annotate if publisher else None,
        driver_free=driver_free,
    )
    mps = None
    if settings.mps_dir is not None:
        from berth.runtime.agent.mps import MpsDaemons, prepare

        prepare(settings.mps_dir)
        mps = MpsDaemons(settings.mps_dir, [gpu.uuid for gpu in gpus],
                         report=publisher.mps if publisher else None)  # fmt: skip
        mps.start()
    if egress is not None:
        from berth.runtime.agent.pod_egress import EgressCollector

        agent.metrics.registry.register(EgressCollector(egress))
    if settings.metrics_port:
        # Prometheus cannot scrape a unix socket: the ledger's metrics on TCP too (pod network).
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, registry=agent.metrics.registry)
        log.info("metrics on TCP port %d", settings.metrics_port)
    for gpu in gpus:
        log.info("GPU %d %s (%s): %d bytes, %d reserved", gpu.index, gpu.uuid, gpu.name,
                 gpu.capacity, gpu.reserved)  # fmt: skip
    if ledger.recovering(time.monotonic()):
        waiting = "unknown tenants" if known is None else f"{len(known)} tenant(s) to re-register"
        log.info("node agent epoch %s on %s: no grants for up to %.1f s, waiting for %s",
                 epoch, settings.socket, settings.policy.grace_s, waiting)  # fmt: skip
    else:
        log.info("node agent epoch %s on %s: no previous tenants, granting", epoch, settings.socket)
    tick_s = min(1.0, settings.policy.heartbeat_interval_s / 2)
    app = create_app(agent, tick_s)
    config = uvicorn.Config(
        app, uds=str(settings.socket), log_level=settings.log_level, access_log=False
    )
    # uvicorn drains on SIGTERM, then re-raises the signal under the handler found at start:
    # this one, so the socket is removed below and the agent exits 0 instead of dying by it.
    signal.signal(signal.SIGTERM, _exit_cleanly)

    class Server(uvicorn.Server):
        """uvicorn, answering the orders long polls as soon as a shutdown begins (it drains
        its connections first, and a poll would hold it for up to its ``wait_s``)."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            agent.close_polls()
            super().handle_exit(sig, frame)

    try:
        Server(config).run()
    finally:
        settings.socket.unlink(missing_ok=True)
        stop.set()
        if pods:
            pods.close()
        if egress:
            egress.close()
        if publisher:
            publisher.close()
        if driver_free:
            driver_free.close()
        if mps:
            mps.close()


@click.command("node-agent")
@click.option(
    "--socket",
    "socket_path",
    default=agent_protocol.DEFAULT_SOCKET,
    show_default=True,
    envvar=agent_protocol.ENV_SOCKET,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The unix socket runtimes register on.",
)
@click.option(
    "--state-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where the agent records who holds a lease, so a restarted agent knows whom to wait "
    "for; keep it on tmpfs (gone after a reboot) [default: agent-tenants.json beside the socket].",
)
@click.option(
    "--simulate-gpus",
    envvar="BERTH_SIMULATE_GPUS",
    help="No NVML: simulated GPUs, '2x80Gi' or 'GPU-a:80Gi,GPU-b:40Gi'.",
)
@click.option(
    "--reserve",
    "reserve_bytes",
    default="0",
    show_default=True,
    envvar="BERTH_GPU_RESERVE",
    callback=_quantity,
    help="Memory per GPU kept back from tenants (driver, CUDA contexts), e.g. 1Gi.",
)
@click.option("--heartbeat-interval", default=1.0, show_default=True,
              type=click.FloatRange(min=0.05), help="Seconds between a tenant's heartbeats.")  # fmt: skip
@click.option("--lease", "lease_s", default=10.0, show_default=True,
              type=click.FloatRange(min=0.1),
              help="Seconds without a heartbeat after which a tenant is dropped.")  # fmt: skip
@click.option("--reclaim-deadline", default=5.0, show_default=True,
              type=click.FloatRange(min=0.0), help="Seconds a tenant has to honour a reclaim.")  # fmt: skip
@click.option("--park-deadline", default=30.0, show_default=True,
              type=click.FloatRange(min=0.0),
              help="Seconds an idle tenant has to park (warm standby) when asked.")  # fmt: skip
@click.option("--grace", "grace_s", type=click.FloatRange(min=0.0),
              help="Seconds after start with no grants, while tenants re-register "
              "[default: the lease].")  # fmt: skip
@click.option("--node-name", envvar="NODE_NAME",
              help="Publish the GPUs on this Node and post events on tenants' pods.")  # fmt: skip
@click.option("--kubeconfig", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Credentials [default: $KUBECONFIG, ~/.kube/config, else in-cluster].")  # fmt: skip
@click.option("--seccomp-dir", default=KUBELET_SECCOMP_DIR, show_default=True,
              envvar="BERTH_SECCOMP_DIR", type=click.Path(file_okay=False, path_type=Path),
              help="The kubelet's seccomp folder (<its --root-dir>/seccomp): sandboxed pods' "
              "profiles go there (with --node-name).")  # fmt: skip
@click.option("--egress/--no-egress", default=True, show_default=True, envvar="BERTH_EGRESS",
              help="Hold sandboxed pods' egress to their allowlists with the eBPF enforcer "
              "(with --node-name; needs root and a kernel with cgroup BPF).")  # fmt: skip
@click.option("--cluster-dns", default="", envvar="BERTH_CLUSTER_DNS", callback=_addresses,
              help="Comma-separated addresses of the cluster's DNS servers (the kubelet's "
              "clusterDNS): the only resolvers sandboxed pods may query.")  # fmt: skip
@click.option("--metrics-port", default=0, show_default=True, envvar="BERTH_AGENT_METRICS_PORT",
              type=click.IntRange(0, 65535),
              help="Also serve /metrics on this TCP port, all addresses, for Prometheus "
              "(0: only on the unix socket).")  # fmt: skip
@click.option("--mps-dir", envvar="BERTH_MPS_HOST_DIR",
              type=click.Path(file_okay=False, path_type=Path),
              help="Run an NVIDIA MPS control daemon per GPU with its pipes under this host "
              "folder, and make <dir>/shm the /dev/shm that servers and runtime pods share "
              "(the operator's BERTH_MPS_HOST_DIR names the same folder).")  # fmt: skip
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))  # fmt: skip
def node_agent(
    socket_path: Path,
    state_file: Path | None,
    simulate_gpus: str | None,
    reserve_bytes: int,
    heartbeat_interval: float,
    lease_s: float,
    reclaim_deadline: float,
    park_deadline: float,
    grace_s: float | None,
    node_name: str | None,
    kubeconfig: Path | None,
    seccomp_dir: Path,
    egress: bool,
    cluster_dns: tuple[str, ...],
    metrics_port: int,
    mps_dir: Path | None,
    log_level: str,
) -> None:
    """Arbitrate GPU memory between the runtimes on this node (protocol: berth.agent_protocol)."""
    if heartbeat_interval >= lease_s:
        raise click.BadParameter("must be below --lease", param_hint="--heartbeat-interval")
    if grace_s is not None and grace_s < lease_s:
        # Shorter, and a live tenant might not have re-registered before grants resume.
        raise click.BadParameter("must be at least --lease", param_hint="--grace")
    policy = LeasePolicy(
        heartbeat_interval_s=heartbeat_interval,
        lease_s=lease_s,
        reclaim_deadline_s=reclaim_deadline,
        park_deadline_s=park_deadline,
        grace_s=lease_s if grace_s is None else grace_s,
    )
    settings = AgentSettings(
        socket=socket_path,
        state_file=state_file or socket_path.parent / "agent-tenants.json",
        simulate_gpus=simulate_gpus,
        reserve_bytes=reserve_bytes,
        policy=policy,
        node_name=node_name,
        kubeconfig=kubeconfig,
        seccomp_dir=seccomp_dir,
        egress=egress,
        cluster_dns=cluster_dns,
        metrics_port=metrics_port,
        mps_dir=mps_dir,
        log_level=log_level,
    )
    run(settings)
