"""Kernel tests run the real Triton kernels: on the GPU when there is one, else in Triton's CPU
interpreter (CI). The interpreter must be chosen before any kernel module is imported, because
``triton.jit`` picks interpreted or compiled functions when it decorates them."""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if "berth.kernels.decode" in sys.modules and os.environ["TRITON_INTERPRET"] == "1":
        from berth.kernels.decode import _decode_kernel

        if type(_decode_kernel).__name__ != "InterpretedFunction":
            raise RuntimeError("berth.kernels was imported before TRITON_INTERPRET was set")


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
