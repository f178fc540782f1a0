"""GPU memory as the driver sees it, through NVML (``libnvidia-ml.so.1``, part of every driver).

Two questions only: how much device memory one process holds (its CUDA context, the caching
allocator's segments, CUDA virtual-memory mappings, kernel images: everything, unlike torch's
allocator statistics), and how much a device holds in all. ctypes, no extra package. Inside a
container NVML may report host process ids, so a process can fail to find itself: callers get
None and fall back.
"""

from __future__ import annotations

import ctypes
import functools
import os


class _ProcessInfo(ctypes.Structure):
    _fields_ = [
        ("pid", ctypes.c_uint),
        ("usedGpuMemory", ctypes.c_ulonglong),
        ("gpuInstanceId", ctypes.c_uint),
        ("computeInstanceId", ctypes.c_uint),
    ]


class _Memory(ctypes.Structure):
    _fields_ = [
        ("total", ctypes.c_ulonglong),
        ("free", ctypes.c_ulonglong),
        ("used", ctypes.c_ulonglong),
    ]


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if lib.nvmlInit_v2() != 0:
        return None
    return lib


def _handle(lib: ctypes.CDLL, uuid: str | None, index: int) -> ctypes.c_void_p | None:
    handle = ctypes.c_void_p()
    if uuid:
        name = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
        status = lib.nvmlDeviceGetHandleByUUID(name.encode(), ctypes.byref(handle))
    else:
        status = lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle))
    return handle if status == 0 else None


def process_bytes(pid: int | None = None, uuid: str | None = None, index: int = 0) -> int | None:
    """Device memory held by process ``pid`` (default: this one); None when NVML cannot say."""
    return all_process_bytes(uuid, index).get(os.getpid() if pid is None else pid)


def all_process_bytes(uuid: str | None = None, index: int = 0) -> dict[int, int]:
    """Device memory per process id on one device (empty when NVML cannot say)."""
    lib = _library()
    handle = None if lib is None else _handle(lib, uuid, index)
    if lib is None or handle is None:
        return {}
    fn = getattr(lib, "nvmlDeviceGetComputeRunningProcesses_v3", None) or getattr(
        lib, "nvmlDeviceGetComputeRunningProcesses_v2", None
    )
    if fn is None:
        return {}
    count = ctypes.c_uint(64)
    infos = (_ProcessInfo * 64)()
    if fn(handle, ctypes.byref(count), infos) != 0:
        return {}
    return {int(i.pid): int(i.usedGpuMemory) for i in infos[: count.value]}


def device_memory(uuid: str | None = None, index: int = 0) -> tuple[int, int, int] | None:
    """(total, used, free) bytes of one device, or None."""
    lib = _library()
    handle = None if lib is None else _handle(lib, uuid, index)
    if lib is None or handle is None:
        return None
    mem = _Memory()
    if lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(mem)) != 0:
        return None
    return int(mem.total), int(mem.used), int(mem.free)
