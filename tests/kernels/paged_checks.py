"""Comparison helpers for the kernel tests: float64 ground truth, poisoned outputs, tolerances."""

from __future__ import annotations

import torch

from berth.kernels.synthetic import PagedBatch

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


def poison_chunk_slots(batch: PagedBatch, query_lens: list[int]) -> None:
    """NaN into the cache slots of each sequence's last ``query_lens[b]`` tokens: a kernel given
    the chunk's K/V separately must not read them from the pages. (Callers keep shared pages
    out of the chunks.)"""
    bs = batch.block_size
    flat_k = batch.k_cache.view(-1, *batch.k_cache.shape[2:])
    flat_v = batch.v_cache.view(-1, *batch.v_cache.shape[2:])
    for seq, q_len in enumerate(query_lens):
        length = int(batch.seq_lens[seq])
        positions = torch.arange(length - q_len, length)
        pages = batch.block_tables[seq].cpu()[positions // bs].long()
        slots = (pages * bs + positions % bs).to(flat_k.device)
        flat_k[slots] = float("nan")
        flat_v[slots] = float("nan")
