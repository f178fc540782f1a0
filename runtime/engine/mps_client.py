"""Whether this runtime joins its GPU's NVIDIA MPS server, and the environment that does it.

The node agent runs one MPS control daemon per GPU (``berth.runtime.agent.mps``), its pipes in
``<dir>/<GPU UUID>``; a runtime pod mounts ``<dir>`` at ``BERTH_MPS_DIR``. CUDA reads the
variables below when it initialises, so the server process sets them before it starts the
engine. ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` makes the driver refuse device memory past the
budget's limit: under MPS the burst ceiling is enforced by the driver, not only by the runtime's
own accounting. Without a daemon for this GPU (a node without MPS, or no GPU in the budget) the
runtime runs time-sliced, as it would anyway: CUDA falls back when it finds no daemon.

Torch-free and pure but for one ``exists`` check.
"""

from dataclasses import dataclass, field
from pathlib import Path

from berth.runtime.engine.budget import GpuBudget

PID_FILE = "nvidia-cuda-mps-control.pid"  # the control daemon writes it into its pipe folder


@dataclass(frozen=True)
class MpsClient:
    env: dict[str, str] = field(default_factory=dict)  # to set before CUDA initialises
    why: str = ""

    @property
    def joined(self) -> bool:
        return bool(self.env)


def mps_client(budget: GpuBudget | None, root: str | None) -> MpsClient:
    """The environment that joins the budget's GPU's MPS server, or why not."""
    if not root:
        return MpsClient(why="off: the pod mounts no MPS folder (time-sliced)")
    if budget is None or budget.gpu_uuid is None:
        return MpsClient(why="off: the budget names no GPU (time-sliced)")
    pipes = Path(root) / budget.gpu_uuid
    if not (pipes / PID_FILE).exists():
        return MpsClient(why=f"off: no MPS control daemon for {budget.gpu_uuid} on this node "
                             f"(nothing at {pipes / PID_FILE}; time-sliced)")  # fmt: skip
    limit_mib = budget.limit_bytes >> 20
    env = {
        "CUDA_MPS_PIPE_DIRECTORY": str(pipes),
        # The one device the client sees is its own GPU, ordinal 0.
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": f"0={limit_mib}M",
    }
    return MpsClient(env, f"on: {pipes}, device memory capped at {limit_mib} MiB (the limit)")
