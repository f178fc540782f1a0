"""Kernel tests run the real Triton kernels: on the GPU when there is one, else in Triton's CPU
interpreter (CI; tests/conftest.py sets it). ``triton.jit`` chooses interpreted or compiled
functions when it decorates them, so kernel modules that something imported before the variable
was set (compiled flavour) are reloaded to pick it up."""

import importlib
import os
import sys

import pytest
import torch

KERNEL_MODULES = (
    "berth.kernels.kv_cache",
    "berth.kernels.rope_kv",  # imports kv_cache's jit functions
    "berth.kernels.decode",
    "berth.kernels.kv_tiles",  # before prefill, which imports its jit functions
    "berth.kernels.prefill",
    "berth.kernels.penalties",
)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    stale = [name for name in KERNEL_MODULES if name in sys.modules]
    for name in stale:
        importlib.reload(sys.modules[name])
    if stale:
        importlib.reload(sys.modules["berth.kernels"])


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """GPU-only tests (full shapes, bf16, CUDA graphs) skip where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
