"""The GPUs the agent arbitrates: read from NVML on a GPU node, or described by a flag in CI.

NVML is reached through ctypes on ``libnvidia-ml.so.1`` (the driver ships it; no Python package
needed, and it works the same on every cuda-python version). The simulation spec lets a machine
without a GPU run the real agent: ``2x80Gi`` (two GPUs with made-up, stable UUIDs) or
``GPU-aaa:80Gi,GPU-bbb:40Gi`` (explicit UUIDs).
"""

import ctypes
import hashlib
import re
import threading

from berth.runtime.agent.ledger import GpuMemory

NVML_SUCCESS = 0


class GpuDiscoveryError(RuntimeError):
    pass


def simulated(spec: str, node: str = "local", reserved: int = 0) -> list[GpuMemory]:
    """GPUs from ``NxQUANTITY`` or ``UUID:QUANTITY[,UUID:QUANTITY...]``; UUIDs of the first form
    are derived from the node name, so a restarted agent finds the same GPUs."""
    from berth.operator.api import quantity_bytes  # kubernetes' parser; NVML needs none of it

    spec = spec.strip()
    counted = re.fullmatch(r"(\d+)x(\S+)", spec)
    try:
        if counted:
            count, capacity = int(counted.group(1)), quantity_bytes(counted.group(2))
            if count < 1:
                raise ValueError("the count must be at least 1")
            return [
                GpuMemory(_sim_uuid(node, i), i, "simulated", capacity, reserved)
                for i in range(count)
            ]
        gpus = []
        for index, item in enumerate(part for part in spec.split(",") if part):
            uuid, sep, quantity = item.rpartition(":")
            if not sep or not uuid:
                raise ValueError(f"{item!r} is not UUID:QUANTITY")
            gpus.append(GpuMemory(uuid, index, "simulated", quantity_bytes(quantity), reserved))
    except ValueError as error:
        raise GpuDiscoveryError(
            f"--simulate-gpus {spec!r}: {error}; expected e.g. 2x80Gi or GPU-a:80Gi,GPU-b:40Gi"
        ) from error
    if not gpus:
        raise GpuDiscoveryError(f"--simulate-gpus {spec!r} describes no GPU")
    if len({g.uuid for g in gpus}) != len(gpus):
        raise GpuDiscoveryError(f"--simulate-gpus {spec!r} repeats a UUID")
    return gpus


def _sim_uuid(node: str, index: int) -> str:
    digest = hashlib.sha256(f"{node}/{index}".encode()).hexdigest()
    return f"GPU-sim-{digest[:8]}-{digest[8:12]}-{digest[12:16]}"


class _Memory(ctypes.Structure):
    _fields_ = [
        ("total", ctypes.c_ulonglong),
        ("free", ctypes.c_ulonglong),
        ("used", ctypes.c_ulonglong),
    ]


def _load(library: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(library)
    except OSError as error:
        raise GpuDiscoveryError(f"NVML is not available ({error}); pass --simulate-gpus") from error


def _check(lib: ctypes.CDLL, result: int, call: str) -> None:
    if result != NVML_SUCCESS:
        lib.nvmlErrorString.restype = ctypes.c_char_p
        raise GpuDiscoveryError(f"{call} failed: {lib.nvmlErrorString(result).decode()}")


def nvml(reserved: int = 0, library: str = "libnvidia-ml.so.1") -> list[GpuMemory]:
    """Every GPU NVML sees, in index order (the order ``nvidia-smi`` and the scheduler use)."""
    lib = _load(library)

    def check(result: int, call: str) -> None:
        _check(lib, result, call)

    check(lib.nvmlInit_v2(), "nvmlInit")
    try:
        count = ctypes.c_uint()
        check(lib.nvmlDeviceGetCount_v2(ctypes.byref(count)), "nvmlDeviceGetCount")
        gpus = []
        for index in range(count.value):
            handle = ctypes.c_void_p()
            check(lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)), "GetHandle")
            uuid = ctypes.create_string_buffer(96)
            check(lib.nvmlDeviceGetUUID(handle, uuid, 96), "nvmlDeviceGetUUID")
            name = ctypes.create_string_buffer(96)
            check(lib.nvmlDeviceGetName(handle, name, 96), "nvmlDeviceGetName")
            memory = _Memory()
            check(lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)), "GetMemoryInfo")
            gpus.append(
                GpuMemory(uuid.value.decode(), index, name.value.decode(), memory.total, reserved)
            )
        return gpus
    finally:
        lib.nvmlShutdown()


class DriverFree:
    """What the driver shows free on each GPU, read on demand (NVML stays initialised): the
    agent grants a waking tenant only memory the driver really has back, since a parked
    process may still be freeing what it released."""

    def __init__(self, uuids: list[str], library: str = "libnvidia-ml.so.1") -> None:
        self._lib = _load(library)
        self._lock = threading.Lock()
        _check(self._lib, self._lib.nvmlInit_v2(), "nvmlInit")
        self._handles: dict[str, ctypes.c_void_p] = {}
        for uuid in uuids:
            handle = ctypes.c_void_p()
            result = self._lib.nvmlDeviceGetHandleByUUID(uuid.encode(), ctypes.byref(handle))
            _check(self._lib, result, f"nvmlDeviceGetHandleByUUID({uuid})")
            self._handles[uuid] = handle

    def __call__(self) -> dict[str, int]:
        """Free bytes per GPU UUID; a GPU NVML cannot read now is left out (no cap on it)."""
        free = {}
        with self._lock:
            for uuid, handle in self._handles.items():
                memory = _Memory()
                if self._lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) == NVML_SUCCESS:
                    free[uuid] = int(memory.free)
        return free

    def close(self) -> None:
        self._lib.nvmlShutdown()
