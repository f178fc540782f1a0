"""Host-to-device copies that never wait for the device.

A plain copy from pageable memory (as ``torch.tensor(values, device=cuda)`` makes) waits for
the stream, that is for the step still running on the device, and the engine's pipelining is
lost. Staged through pinned memory, the copy is queued and the host goes on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` copied to ``device`` without blocking the host."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def upload_values(
    values: np.ndarray | Sequence[object], device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``values`` (a list, nested lists or a numpy array) as a tensor on ``device``, without
    waiting for it: of ``dtype``, else an array's own type or int64."""
    if dtype is None and not isinstance(values, np.ndarray):
        dtype = torch.int64
    return upload(torch.as_tensor(values, dtype=dtype), device)
