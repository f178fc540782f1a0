"""The model's weights in one byte range that can be given back and filled again in place.

Every parameter and buffer of the model is a view of one flat byte tensor, laid out once from
the model's shapes while it is still on the meta device (nothing is allocated twice). On the
GPU the flat tensor spans one CUDA virtual-memory range (``cuda_vmm``): :meth:`release` unmaps
it, returning the physical memory to the driver, and :meth:`restore` maps new memory at the
same addresses and copies the weights back from a pinned host image in large chunks. Every
pointer into the weights (the CUDA graphs captured at load among them) stays valid.

On the CPU the same layout sits in an ordinary tensor, and release and restore resize its
storage to nothing and back (views follow the storage), so CI runs the same code and proves
that the weights come back exactly.

The host image is taken once, after loading (:meth:`keep_host_copy`); pinning it costs time at
load (about 0.6 s per GiB measured on an H200 host), which is why only a runtime with standby
on keeps one.
"""

from __future__ import annotations

import torch

ALIGN = 256  # bytes: each tensor's offset, enough for any dtype and vectorized loads
COPY_CHUNK = 1 << 30  # bytes per host-to-device copy when restoring


class WeightArena:
    """The model's parameters and buffers as views of one flat range on ``device``."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        """Lay out ``model``'s tensors (on the meta device) in one range on ``device`` and make
        each of them a view of it (tied parameters stay one tensor). Contents are undefined
        until the weights are loaded into the views."""
        entries: list[tuple[torch.nn.Module, str, bool, torch.Tensor]] = []
        for module in model.modules():
            entries += [
                (module, n, True, p) for n, p in module._parameters.items() if p is not None
            ]
            entries += [(module, n, False, b) for n, b in module._buffers.items() if b is not None]
        offsets: dict[int, int] = {}  # id(meta tensor) -> byte offset
        size = 0
        for _, _, _, t in entries:
            if id(t) not in offsets:
                offsets[id(t)] = size
                size += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
        self.device = device
        self.nbytes = size
        self._range = None
        if device.type == "cuda":
            from berth.runtime.engine.cuda_vmm import VirtualRange

            self._range = VirtualRange(max(size, 1), device)
            self._range.map(0, self._range.size)
            self.flat = self._range.tensor(torch.uint8, (self._range.size,))
        else:
            self.flat = torch.empty(max(size, 1), dtype=torch.uint8, device=device)
        views: dict[int, torch.Tensor] = {}
        for module, name, is_param, t in entries:
            view = views.get(id(t))
            if view is None:
                start = offsets[id(t)]
                raw = self.flat[start : start + t.numel() * t.element_size()]
                view = raw.view(t.dtype).view(t.shape)
                if is_param:
                    view = torch.nn.Parameter(view, requires_grad=False)
                views[id(t)] = view
            if is_param:
                module._parameters[name] = view  # type: ignore[assignment]
            else:
                module._buffers[name] = view
        self.host: torch.Tensor | None = None
        self.resident = True

    def keep_host_copy(self) -> None:
        """Copy the loaded weights into a host image (pinned on the GPU) for later restores."""
        pin = self.device.type == "cuda"
        host = torch.empty(self.flat.numel(), dtype=torch.uint8, pin_memory=pin)
        host.copy_(self.flat)
        self.host = host

    @property
    def mapped_bytes(self) -> int:
        """Device memory the weights hold now."""
        return self.flat.numel() if self.resident else 0

    def release(self) -> None:
        """Give the weights' memory back; the caller has synchronized the device and reads no
        weight until :meth:`restore`."""
        if self.host is None:
            raise RuntimeError("the weights have no host copy to come back from (standby is off)")
        if not self.resident:
            return
        if self._range is not None:
            self._range.unmap(0)
        else:
            self.flat.untyped_storage().resize_(0)
        self.resident = False

    def restore(self, wait: bool = True) -> None:
        """Back the range with memory again (same addresses) and copy the weights in, chunk by
        chunk; raises (still released) when the device has no memory for them. ``wait=False``
        returns once the copies are queued (the caller synchronizes), so that the host can map
        other memory while they run."""
        if self.resident:
            return
        assert self.host is not None
        n = self.flat.numel()
        if self._range is not None:
            self._range.map(0, self._range.size)
        else:
            self.flat.untyped_storage().resize_(n)
        for offset in range(0, n, COPY_CHUNK):
            end = min(offset + COPY_CHUNK, n)
            self.flat[offset:end].copy_(self.host[offset:end], non_blocking=True)
        if wait and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.resident = True
