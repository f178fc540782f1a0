"""CUDA virtual memory management: one reserved address range, physical memory mapped in pieces.

A thin adapter over the driver API of NVIDIA's cuda-python (``cuda.bindings.driver``): reserve a
virtual range once (``cuMemAddressReserve``), then back any aligned piece of it with physical
memory (``cuMemCreate`` + ``cuMemMap`` + ``cuMemSetAccess``) or give a piece back
(``cuMemUnmap`` + ``cuMemRelease``). Pointers into the range never change, so a tensor viewed
over it, the block tables that index it and the CUDA graphs captured over it stay valid while
memory comes and goes. Touching an unmapped piece is an illegal address: callers keep their
reads inside mapped pieces.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any

import torch


def _driver() -> Any:
    try:
        return importlib.import_module("cuda.bindings.driver")
    except ImportError:  # cuda-python before 12.6 named the module differently
        return importlib.import_module("cuda.cuda")


class CudaVmmError(RuntimeError):
    pass


def _check(result: tuple[Any, ...] | Any, what: str) -> Any:
    """The driver's (status, *values) -> values; raise naming the call on an error."""
    drv = _driver()
    status, *values = result if isinstance(result, tuple) else (result,)
    if status != drv.CUresult.CUDA_SUCCESS:
        _, name = drv.cuGetErrorName(status)
        raise CudaVmmError(f"{what} failed: {name.decode() if name else status}")
    return values[0] if len(values) == 1 else tuple(values)


class VirtualRange:
    """``size`` bytes of reserved device address space on one device; ``map``/``unmap`` back
    aligned pieces of it (offset and size multiples of ``granularity``) with physical memory."""

    def __init__(self, size: int, device: torch.device) -> None:
        drv = _driver()
        self._drv = drv
        torch.cuda.init()  # the primary context that torch uses, current on this thread
        _check(drv.cuInit(0), "cuInit")
        self.device_index = device.index if device.index is not None else 0
        prop = drv.CUmemAllocationProp()
        prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = self.device_index
        self._prop = prop
        flag = drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
        self.granularity = int(
            _check(drv.cuMemGetAllocationGranularity(prop, flag), "cuMemGetAllocationGranularity")
        )
        self.size = -(-size // self.granularity) * self.granularity
        self.base = int(
            _check(
                drv.cuMemAddressReserve(self.size, self.granularity, 0, 0), "cuMemAddressReserve"
            )
        )
        access = drv.CUmemAccessDesc()
        access.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = self.device_index
        access.flags = drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = access
        self._handles: dict[int, tuple[Any, int]] = {}  # offset -> (handle, size)

    @property
    def mapped_bytes(self) -> int:
        return sum(size for _, size in self._handles.values())

    def map(self, offset: int, size: int) -> None:
        """Back ``[offset, offset + size)`` with new physical memory (contents undefined)."""
        self._check_piece(offset, size)
        if offset in self._handles:
            raise CudaVmmError(f"the piece at offset {offset} is already mapped")
        drv = self._drv
        handle = _check(drv.cuMemCreate(size, self._prop, 0), "cuMemCreate")
        ptr = self.base + offset
        try:
            _check(drv.cuMemMap(ptr, size, 0, handle, 0), "cuMemMap")
            try:
                _check(drv.cuMemSetAccess(ptr, size, [self._access], 1), "cuMemSetAccess")
            except CudaVmmError:
                drv.cuMemUnmap(ptr, size)
                raise
        except CudaVmmError:
            drv.cuMemRelease(handle)
            raise
        self._handles[offset] = (handle, size)

    def unmap(self, offset: int) -> None:
        """Give back the piece mapped at ``offset``; the caller has synchronized the device."""
        handle, size = self._handles.pop(offset)
        _check(self._drv.cuMemUnmap(self.base + offset, size), "cuMemUnmap")
        _check(self._drv.cuMemRelease(handle), "cuMemRelease")

    def _check_piece(self, offset: int, size: int) -> None:
        g = self.granularity
        if offset % g or size % g or size <= 0 or offset + size > self.size:
            raise CudaVmmError(
                f"piece [{offset}, {offset + size}) is not aligned to {g} bytes inside a range "
                f"of {self.size}"
            )

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """The whole range as a tensor (mapped or not: read only what is mapped)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        numel = 1
        for n in shape:
            numel *= n
        if numel * itemsize > self.size:
            raise CudaVmmError(f"a {shape} {dtype} tensor does not fit {self.size} bytes")
        view = _ArrayView(self.base, numel * itemsize, self)
        raw = torch.as_tensor(view, device=self.device())
        return raw.view(dtype).view(shape)

    def device(self) -> torch.device:
        return torch.device("cuda", self.device_index)

    def __del__(self) -> None:
        # Tensors viewed over the range keep it alive (through their ``_ArrayView``), so this
        # runs only once nothing can read it: a dropped engine gives its KV memory back.
        with contextlib.suppress(Exception):  # at shutdown the driver may be gone already
            self.close()

    def close(self) -> None:
        """Unmap everything and free the reservation (no tensor over it may be used after).
        Work still queued on the device may read the range (an engine dropped with a step in
        flight): unmapping under it is an illegal address, which then aborts the process at
        its next CUDA call, so the device finishes first."""
        if self._handles:
            torch.cuda.synchronize(self.device())
        for offset in list(self._handles):
            self.unmap(offset)
        if self.size:
            _check(self._drv.cuMemAddressFree(self.base, self.size), "cuMemAddressFree")
            self.size = 0


class _ArrayView:
    """A byte array at a device address, in the ``__cuda_array_interface__`` protocol; torch
    keeps it (and so ``owner``, the range) alive as long as a tensor made from it lives."""

    def __init__(self, ptr: int, nbytes: int, owner: VirtualRange) -> None:
        self.owner = owner
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
            "strides": None,
        }


def vmm_available() -> bool:
    """cuda-python is installed and its driver module loads."""
    try:
        _driver()
    except ImportError:
        return False
    return True
