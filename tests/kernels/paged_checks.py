"""Comparison helpers for the kernel tests: float64 ground truth, poisoned outputs, tolerances."""

from __future__ import annotations

import torch

# Relative L2 error allowed against a float64 reference. fp32 covers the GPU's tf32 dot.
TOLERANCE = {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}

# bf16 tl.dot multiplies raw bits in the CPU interpreter (triton-lang/triton#11584).
CPU_DTYPES = [torch.float16, torch.float32]
GPU_DTYPES = [torch.float16, torch.bfloat16]


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN: any element the kernel fails to write fails the check."""
    return torch.full_like(t, float("nan"))


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum()} elements not written"
    err = float((out.double() - ref.double()).norm() / ref.double().norm())
    assert err < TOLERANCE[dtype], f"relative error {err:.2e} over {TOLERANCE[dtype]:.0e}"
