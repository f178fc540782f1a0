"""Names that the operator and the runtime both read: pod annotations, labels and env vars.

Torch-free and dependency-free, so that the operator image and the runtime image agree on one
spelling. The GPU scheduler writes the ``GPU_*`` annotations on a pod before it binds it; the
runtime reads them through the downward API (an env var or a mounted file).
"""

from typing import Final

GROUP: Final = "berth.dev"
VERSION: Final = "v1alpha1"
FIELD_MANAGER: Final = "berth"
SCHEDULER_NAME: Final = "berth"

# Node labels published by NVIDIA's GPU feature discovery (or, on kwok nodes, by the inventory).
NODE_GPU_PRODUCT: Final = "nvidia.com/gpu.product"
NODE_GPU_MEMORY_MIB: Final = "nvidia.com/gpu.memory"  # per GPU, MiB
NODE_GPU_COUNT: Final = "nvidia.com/gpu.count"
GPU_RESOURCE: Final = "nvidia.com/gpu"
# Comma-separated GPU UUIDs in device-index order, annotated on the Node by Berth's node agent.
NODE_GPU_UUIDS: Final = f"{GROUP}/gpu-uuids"
# Comma-separated bytes per GPU, in the same order: what the node agent lets tenants share
# (the device's memory minus the agent's reserve). The scheduler packs requests against it.
NODE_GPU_MEMORY_BYTES: Final = f"{GROUP}/gpu-memory-bytes"
# The node agent's NVIDIA MPS daemons on this node (runtime/agent/mps.py): "running on N GPU(s)",
# or why not ("unavailable: ..."); absent when the agent runs without --mps-dir.
NODE_MPS: Final = f"{GROUP}/mps"

# Pod annotations written by the GPU scheduler (the ledger lives in these).
POD_GPU_UUID: Final = f"{GROUP}/gpu-uuid"
POD_GPU_INDEX: Final = f"{GROUP}/gpu-index"
POD_GPU_MEMORY_REQUEST: Final = f"{GROUP}/gpu-memory-request"  # bytes
POD_GPU_MEMORY_LIMIT: Final = f"{GROUP}/gpu-memory-limit"  # bytes
# The device the container sees: the GPU's UUID when the node agent published it, else its index.
POD_VISIBLE_DEVICES: Final = f"{GROUP}/visible-devices"

# Pod annotations written by the reconciler into the pod template: what the pod asks for.
POD_WANTS_GPU_FRACTION: Final = f"{GROUP}/wants-gpu-fraction"  # "0.5"
POD_WANTS_GPU_MEMORY: Final = f"{GROUP}/wants-gpu-memory"  # a quantity, "20Gi"
POD_WANTS_GPU_MEMORY_LIMIT: Final = f"{GROUP}/wants-gpu-memory-limit"  # a quantity
# "true" while the tenant is parked in host memory (holds no GPU memory); set by the node agent.
POD_STANDBY: Final = f"{GROUP}/standby"
# A sandboxed pod's seccomp profile (JSON), rendered into the pod template by the reconciler; the
# node agent writes it into the kubelet's seccomp folder under the name that the pod's
# securityContext gives (berth/<sha256 of the JSON>.json, operator/seccomp.py).
POD_SECCOMP_PROFILE: Final = f"{GROUP}/seccomp-profile"
# A sandboxed pod's egress rules (JSON: the spec.sandbox.egress list), rendered into the pod
# template; the node agent's eBPF enforcer holds the pod's cgroup to them.
POD_EGRESS_POLICY: Final = f"{GROUP}/egress-policy"

# Labels on every object the operator renders.
LABEL_SERVICE: Final = f"{GROUP}/inference-service"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
# On runtime pods: "true" puts the pod in its Service's endpoints (pods are born with it); the
# autoscaler takes it off replicas its decision parks (operator/routing.py), and notes when.
LABEL_ROUTED: Final = f"{GROUP}/routed"
POD_UNROUTED_AT: Final = f"{GROUP}/unrouted-at"  # seconds since the epoch

# Environment variables through which the runtime learns its GPU budget (downward API).
ENV_GPU_MEMORY_REQUEST: Final = "BERTH_GPU_MEMORY_REQUEST"
ENV_GPU_MEMORY_LIMIT: Final = "BERTH_GPU_MEMORY_LIMIT"
ENV_GPU_UUID: Final = "BERTH_GPU_UUID"
ENV_VISIBLE_DEVICES: Final = "NVIDIA_VISIBLE_DEVICES"  # read by the NVIDIA container runtime
# The pod's own name and namespace (downward API): the tenant name the runtime registers under.
ENV_POD_NAME: Final = "POD_NAME"
ENV_POD_NAMESPACE: Final = "POD_NAMESPACE"
# The node agent's unix socket (berth.agent_protocol); the pod mounts it from the host.
ENV_AGENT_SOCKET: Final = "BERTH_AGENT_SOCKET"
ENV_RUNTIME_IMAGE: Final = "BERTH_RUNTIME_IMAGE"  # operator setting: the image it renders
# NVIDIA MPS (runtime/agent/mps.py): the node agent runs one control daemon per GPU with its pipes
# in <dir>/<GPU UUID>; a runtime pod mounts <dir> here and joins its GPU's server when one runs.
ENV_MPS_DIR: Final = "BERTH_MPS_DIR"
MPS_DIR: Final = "/run/berth-mps"  # where a runtime container sees the node's MPS folder
MPS_SHM: Final = "shm"  # under the node's MPS folder: the /dev/shm that servers and clients share
# Warm standby (ARCHITECTURE section 5). Set: the runtime may park (release its GPU memory and
# keep a host copy of its weights) and registers with the node agent as able to; the value is the
# idle time in seconds after which it parks on its own (0: only when the agent or an admin asks).
# Absent: standby is off and the runtime never parks.
ENV_STANDBY_IDLE_SECONDS: Final = "BERTH_STANDBY_IDLE_SECONDS"
# The bearer token of the runtime's admin endpoints (POST /admin/park, /admin/wake,
# /admin/rotation), from the pod's Secret. Absent: the admin endpoints are disabled (403).
ENV_ADMIN_TOKEN: Final = "BERTH_ADMIN_TOKEN"
# Where the downward-API volume puts the pod's annotations (updated live, unlike env vars).
POD_INFO_DIR: Final = "/etc/berth/pod"

# A model URI on the Hugging Face Hub: hf://org/repo or hf://org/repo@revision. The CRD admits
# only these (CEL), and the runtime's storage initializer (berth fetch-model) parses them.
HF_MODEL_URI: Final = r"^hf://[A-Za-z0-9][-_.A-Za-z0-9]*/[-_.A-Za-z0-9]+(@[-_./A-Za-z0-9]+)?$"

# Where a container leaves why it stopped (Kubernetes' default terminationMessagePath); the
# kubelet keeps at most 4096 bytes of it.
TERMINATION_LOG: Final = "/dev/termination-log"
TERMINATION_MESSAGE_BYTES: Final = 4096

# Pod shutdown, in seconds. The kubelet runs the preStop sleep first (the grace period counts
# from its start), so that the pod's removal from the Service's endpoints reaches every proxy;
# then SIGTERM: the runtime fails /ready but still admits for RUNTIME_SHUTDOWN_DELAY_S (its
# responses close their connections, so keep-alive clients reconnect elsewhere), lets in-flight
# requests finish for up to RUNTIME_DRAIN_TIMEOUT_S, then aborts the rest, closes connections
# and stops its engine in bounded steps (runtime/server/lifecycle.py ``ShutdownBudget``). The
# pod's terminationGracePeriodSeconds holds all of it with margin (a test checks the sum).
PRESTOP_SLEEP_S: Final = 5
RUNTIME_SHUTDOWN_DELAY_S: Final = 2
RUNTIME_DRAIN_TIMEOUT_S: Final = 30
TERMINATION_GRACE_PERIOD_S: Final = 60
