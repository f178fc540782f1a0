"""The GPU memory budget of one runtime: which GPU, how much is guaranteed, how far it may burst.

Under the operator the GPU scheduler writes the budget into the pod's annotations before it
binds the pod, and the pod template hands it to the container twice (``berth.wire``): as env
vars (``BERTH_GPU_MEMORY_REQUEST``/``LIMIT``/``UUID``, fixed at container start) and as the
downward-API file ``/etc/berth/pod/annotations`` (kept up to date by the kubelet). The file wins
where it holds a key. The template always sets the env vars, so a runtime whose env has any of
them (even empty, which is what the downward API gives for an annotation the scheduler did not
write) or that sees the file is running under the operator and must have a valid budget: it
refuses to start with an error naming the variable rather than guess. With none of them (local
``berth serve``) there is no budget: the runtime takes the whole device, or a CPU default pool.

Torch-free: the server process reads the budget before it starts the engine.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from berth import wire

ANNOTATIONS_FILE = "annotations"  # the downward-API item holding metadata.annotations
_LINE = re.compile(r'^(?P<key>[^=]+)="(?P<value>.*)"$')


class BudgetError(ValueError):
    """The pod's budget is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class GpuBudget:
    """Bytes of GPU memory: ``request`` is guaranteed, ``limit`` (>= request) is the burst
    ceiling; ``gpu_uuid`` is the device the scheduler chose (None: not published)."""

    request_bytes: int
    limit_bytes: int
    gpu_uuid: str | None = None

    def __post_init__(self) -> None:
        if self.request_bytes < 1:
            raise BudgetError(f"the GPU memory request must be >= 1 byte, got {self.request_bytes}")
        if self.limit_bytes < self.request_bytes:
            raise BudgetError(
                f"the GPU memory limit ({self.limit_bytes}) is below the request "
                f"({self.request_bytes})"
            )

    @property
    def elastic(self) -> bool:
        return self.limit_bytes > self.request_bytes


def parse_annotations(text: str) -> dict[str, str]:
    """The downward API's annotations file: one ``key="value"`` per line, Go-quoted values."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if m is None:
            continue
        raw = m.group("value")
        try:
            out[m.group("key")] = json.loads(f'"{raw}"')
        except ValueError:
            out[m.group("key")] = raw
    return out


def _bytes(value: str, name: str) -> int:
    try:
        n = int(value.strip())
    except ValueError:
        raise BudgetError(f"{name} must be a whole number of bytes, got {value!r}") from None
    if n < 1:
        raise BudgetError(f"{name} must be >= 1 byte, got {n}")
    return n


def read_budget(
    environ: Mapping[str, str] | None = None, pod_info_dir: str | Path = wire.POD_INFO_DIR
) -> GpuBudget | None:
    """The budget the pod was given, or None when not running under the operator.

    Raises ``BudgetError`` naming the env var (or the annotation and its file) that is missing
    or malformed.
    """
    env = os.environ if environ is None else environ
    path = Path(pod_info_dir) / ANNOTATIONS_FILE
    annotations = parse_annotations(path.read_text()) if path.is_file() else {}
    names = (wire.ENV_GPU_MEMORY_REQUEST, wire.ENV_GPU_MEMORY_LIMIT, wire.ENV_GPU_UUID)
    if not path.is_file() and not any(n in env for n in names):
        return None  # not under the operator

    def value(env_name: str, key: str) -> tuple[str, str]:
        """(the value, the name to put in an error) with the annotation first."""
        if annotations.get(key, "").strip():
            return annotations[key], f"annotation {key} (in {path})"
        return env.get(env_name, ""), env_name

    request, request_name = value(wire.ENV_GPU_MEMORY_REQUEST, wire.POD_GPU_MEMORY_REQUEST)
    if not request.strip():
        raise BudgetError(
            f"{wire.ENV_GPU_MEMORY_REQUEST} is missing or empty (and {path} has no "
            f"{wire.POD_GPU_MEMORY_REQUEST}): the runtime runs under the operator but the "
            "GPU scheduler gave it no budget; unset the variable to run without one"
        )
    request_bytes = _bytes(request, request_name)
    limit, limit_name = value(wire.ENV_GPU_MEMORY_LIMIT, wire.POD_GPU_MEMORY_LIMIT)
    limit_bytes = _bytes(limit, limit_name) if limit.strip() else request_bytes
    if limit_bytes < request_bytes:
        raise BudgetError(f"{limit_name} ({limit_bytes}) is below {request_name} ({request_bytes})")
    uuid, _ = value(wire.ENV_GPU_UUID, wire.POD_GPU_UUID)
    return GpuBudget(request_bytes, limit_bytes, uuid.strip() or None)


def budget_from_flags(
    request_bytes: int | None, limit_bytes: int | None, gpu_uuid: str | None = None
) -> GpuBudget | None:
    """A budget given on the command line (local use); a limit needs a request."""
    if request_bytes is None:
        if limit_bytes is not None:
            raise BudgetError("--gpu-memory-limit needs --gpu-memory-request")
        return None
    return GpuBudget(request_bytes, request_bytes if limit_bytes is None else limit_bytes, gpu_uuid)


class BudgetTooSmall(ValueError):
    """The request cannot hold the weights, the measured workspace and one KV chunk."""


@dataclass(frozen=True)
class KvPlan:
    """How the KV pool fits the budget: chunks at the request (always held) and at the limit
    (the burst ceiling). ``non_kv_bytes`` = weights + workspace, measured at start-up."""

    budget: GpuBudget
    weights_bytes: int
    workspace_bytes: int
    chunk_bytes: int
    request_chunks: int
    limit_chunks: int

    @property
    def non_kv_bytes(self) -> int:
        return self.weights_bytes + self.workspace_bytes

    def held_bytes(self, num_chunks: int) -> int:
        """All the device memory the runtime holds with ``num_chunks`` chunks mapped."""
        return self.non_kv_bytes + num_chunks * self.chunk_bytes

    def chunks_within(self, nbytes: int) -> int:
        """The most chunks whose ``held_bytes`` stays within ``nbytes``, clamped to
        ``[request_chunks, limit_chunks]`` (the request is never given up)."""
        n = max(0, nbytes - self.non_kv_bytes) // self.chunk_bytes
        return min(max(n, self.request_chunks), self.limit_chunks)


def _gib(n: int) -> str:
    return f"{n} bytes ({n / (1 << 30):.2f} GiB)"


def plan_kv_pool(
    budget: GpuBudget, weights_bytes: int, workspace_bytes: int, chunk_bytes: int
) -> KvPlan:
    """Size the KV pool to ``request - weights - workspace`` (whole chunks), growing to the
    limit's share; raise ``BudgetTooSmall`` with the numbers when not even one chunk fits."""
    non_kv = weights_bytes + workspace_bytes
    request_chunks = max(0, budget.request_bytes - non_kv) // chunk_bytes
    if request_chunks < 1:
        raise BudgetTooSmall(
            f"the GPU memory request of {_gib(budget.request_bytes)} cannot hold this model: "
            f"weights {_gib(weights_bytes)} + measured activation and graph workspace "
            f"{_gib(workspace_bytes)} + one KV-cache chunk {_gib(chunk_bytes)} need at least "
            f"{_gib(non_kv + chunk_bytes)}; give the service more GPU memory (gpu.fraction or "
            "gpu.memory.request) or lower max_num_seqs / max_num_batched_tokens"
        )
    limit_chunks = max(0, budget.limit_bytes - non_kv) // chunk_bytes
    return KvPlan(budget, weights_bytes, workspace_bytes, chunk_bytes, request_chunks, limit_chunks)
