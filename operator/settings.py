"""The operator's settings: one typed object, read once at start-up from env vars and flags."""

import os
from dataclasses import dataclass

import berth
from berth import wire
from berth.operator.ledger import NOTHING, RESERVATION
from berth.operator.placement import PlacementPolicy

MIB = 2**20


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


@dataclass(frozen=True)
class OperatorSettings:
    # The runtime image rendered into every Deployment (kwok never pulls it).
    runtime_image: str = f"ghcr.io/berth-dev/berth-runtime:{berth.__version__}"
    # GPU memory kept free on every GPU for CUDA contexts and the node agent; on top of the
    # agent's own reserve where the agent publishes its GPUs' memory (gpus.node_from_object).
    gpu_reserve_mib: int = 0
    # Standby tenants may overcommit a GPU's memory up to this factor (they hold none of it).
    standby_overcommit: float = 2.0
    # The host folder where Berth's node agent serves its socket (berth.agent_protocol); every
    # runtime pod mounts it to lease its GPU memory. Empty: pods mount nothing and run within their
    # requests (no bursts, no standby arbitration).
    agent_socket_dir: str = "/run/berth/agent"
    # The host folder of the node agents' NVIDIA MPS daemons (``node-agent --mps-dir``). Set:
    # every runtime pod but sandboxed ones mounts it, and its ``shm`` as /dev/shm, and joins its
    # GPU's MPS server where one runs (kernels of the tenants of a GPU run side by side instead of
    # in time slices). Empty: time-sliced sharing, nothing mounted.
    mps_host_dir: str = ""
    # Only these namespaces (empty: all).
    namespaces: tuple[str, ...] = ()
    # Pending pods gathered for this long are placed together, largest first.
    batch_window_s: float = 0.2
    # Concurrent Binding requests in flight.
    bind_workers: int = 16
    # "Scheduled" events posted per second at most (they trail a burst of binds).
    event_qps: float = 50.0
    # Threads for the reconciler's blocking API calls (applies, status patches, events).
    api_threads: int = 32
    # An assumed GPU share (booked, bind sent) that the API server has not confirmed within this
    # many seconds after the Binding call returned is freed again.
    assume_ttl_s: float = 30.0
    # Reservation pods (one per GPU with Berth tenants, requesting nvidia.com/gpu: 1) make
    # Berth's GPUs visible to kube-scheduler and ResourceQuotas.
    gpu_reservations: bool = True
    reservation_namespace: str = "berth-system"
    reservation_image: str = "registry.k8s.io/pause:3.10"
    reservation_priority_class: str = "system-node-critical"
    # Only pods whose controller chain ends at their InferenceService get a share. Off only for
    # benchmarks that post bare pods; never in a cluster with tenants.
    require_owner: bool = True
    # /healthz, /readyz and /metrics on this port (0: any free port, logged; -1: off).
    health_port: int = 8081
    # /healthz fails when a loop made no progress for this long.
    loop_stuck_s: float = 300.0
    run_reconciler: bool = True
    run_scheduler: bool = True
    # Leader election: only the holder of this Lease reconciles and schedules.
    leader_elect: bool = True
    lease_name: str = "berth-operator"
    lease_namespace: str = ""  # empty: the pod's own namespace, else "default"
    lease_duration_s: float = 15.0
    renew_deadline_s: float = 10.0
    retry_period_s: float = 2.0
    leader_identity: str = ""  # empty: host name + a random suffix

    @classmethod
    def from_env(cls, **overrides: object) -> "OperatorSettings":
        """Env vars ``BERTH_*`` first, then explicit overrides (the CLI's flags)."""
        namespaces = os.environ.get("BERTH_NAMESPACES", "")
        values: dict[str, object] = {
            "runtime_image": os.environ.get(wire.ENV_RUNTIME_IMAGE, cls.runtime_image),
            "gpu_reserve_mib": _env_int("BERTH_GPU_RESERVE_MIB", cls.gpu_reserve_mib),
            "standby_overcommit": _env_float("BERTH_STANDBY_OVERCOMMIT", cls.standby_overcommit),
            "agent_socket_dir": os.environ.get("BERTH_AGENT_SOCKET_DIR", cls.agent_socket_dir),
            "mps_host_dir": os.environ.get("BERTH_MPS_HOST_DIR", cls.mps_host_dir),
            "namespaces": tuple(n for n in namespaces.split(",") if n),
            "batch_window_s": _env_float("BERTH_BATCH_WINDOW_S", cls.batch_window_s),
            "bind_workers": _env_int("BERTH_BIND_WORKERS", cls.bind_workers),
            "api_threads": _env_int("BERTH_API_THREADS", cls.api_threads),
            "event_qps": _env_float("BERTH_EVENT_QPS", cls.event_qps),
            "assume_ttl_s": _env_float("BERTH_ASSUME_TTL_S", cls.assume_ttl_s),
            "gpu_reservations": os.environ.get("BERTH_GPU_RESERVATIONS", "true").lower()
            not in ("false", "0", "no"),
            "reservation_namespace": os.environ.get(
                "BERTH_RESERVATION_NAMESPACE", cls.reservation_namespace
            ),
            "reservation_image": os.environ.get("BERTH_RESERVATION_IMAGE", cls.reservation_image),
            "reservation_priority_class": os.environ.get(
                "BERTH_RESERVATION_PRIORITY_CLASS", cls.reservation_priority_class
            ),
            "require_owner": os.environ.get("BERTH_REQUIRE_OWNER", "true").lower()
            not in ("false", "0", "no"),
            "health_port": _env_int("BERTH_HEALTH_PORT", cls.health_port),
            "loop_stuck_s": _env_float("BERTH_LOOP_STUCK_S", cls.loop_stuck_s),
            "leader_elect": os.environ.get("BERTH_LEADER_ELECT", "true").lower() != "false",
            "lease_name": os.environ.get("BERTH_LEASE_NAME", cls.lease_name),
            "lease_namespace": os.environ.get("BERTH_LEASE_NAMESPACE", cls.lease_namespace),
            "lease_duration_s": _env_float("BERTH_LEASE_DURATION_S", cls.lease_duration_s),
            "renew_deadline_s": _env_float("BERTH_RENEW_DEADLINE_S", cls.renew_deadline_s),
            "retry_period_s": _env_float("BERTH_RETRY_PERIOD_S", cls.retry_period_s),
            "leader_identity": os.environ.get("BERTH_LEADER_IDENTITY", cls.leader_identity),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    @property
    def connections(self) -> int:
        """HTTP connections to the API server: one per thread that may hold one at a time, so
        that no request waits in the pool: binders, reconciler threads, and 17 more (the
        scheduler's 3 watches, 2 reporters and event poster, the status board's 4 writers and
        3 watches), plus 3 watches per extra namespace."""
        return self.bind_workers + self.api_threads + 17 + 3 * max(0, len(self.namespaces) - 1)

    @property
    def placement_policy(self) -> PlacementPolicy:
        return PlacementPolicy(
            reserve=self.gpu_reserve_mib * MIB,
            standby_overcommit=self.standby_overcommit,
            reservation=RESERVATION if self.gpu_reservations else NOTHING,
        )
