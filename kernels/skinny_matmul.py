"""``x @ w.T`` for a few rows of ``x`` (a decode step's linears at batch 1-16), bandwidth-first.

At a few rows a linear only streams its weight: the floor is the weight's bytes over the HBM
read rate. cuBLAS reaches 85-100 % of it on the large matrices of a decode step, but 60-76 % on
the small ones (Llama-3-8B's QKV, 50 MB, and O, 34 MB, on an H200:
``benchmarks/results/blas-tuning-h200.md``), a fixed cost per kernel of a few microseconds.
This kernel hides some of it: launched as a programmatic dependent (PDL), it starts while the
kernel before it finishes, and asks L2 for the start of its weight slice before it waits for
that kernel's output (the weights never depend on it). One program owns ``BLOCK_N`` output
columns over all of K, the rows padded to 16 for the tensor cores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from berth.kernels import checks

MAX_ROWS = 16  # above this the weight is read once per 16 rows: cuBLAS's tiles do better


@dataclass(frozen=True)
class SkinnyConfig:
    """Launch shape: output columns per program, K per step, prefetched steps, Triton's knobs."""

    block_n: int = 32
    block_k: int = 256
    prefetch_steps: int = 4  # weight steps asked of L2 before the wait (0: none)
    num_warps: int = 4
    num_stages: int = 4


@triton.jit
def _prefetch_l2(ptrs):  # type: ignore[no-untyped-def]
    """Ask L2 for the lines at ``ptrs`` without waiting for them (PTX ``prefetch``)."""
    return tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1]; mov.u32 $0, 0;",
        "=r,l",
        [ptrs],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _skinny_matmul_kernel(  # type: ignore[no-untyped-def]  # Triton kernel: pointer args
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]
    out_ptr,  # [M, N]
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREFETCH_STEPS: tl.constexpr,
    PREFETCH: tl.constexpr,  # the prefetch instruction exists (a GPU, not the interpreter)
    PDL: tl.constexpr = False,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    if PREFETCH:  # the last program's columns past N ask for row N - 1's lines again
        w_lines = w_ptr + tl.minimum(cols, N - 1).to(tl.int64)[:, None] * stride_wn
        # One 128-byte line per 64 bf16 values: a [BLOCK_N, BLOCK_K // 64] grid of lines a step.
        lines = tl.arange(0, BLOCK_K // 64) * 64
        for step in tl.static_range(PREFETCH_STEPS):
            _prefetch_l2(w_lines + step * BLOCK_K + lines[None, :])
    if PDL:  # x is the output of the kernel before
        gdc_wait()
        gdc_launch_dependents()
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    x_rows = x_ptr + rows[:, None] * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + ks < K
        x = tl.load(x_rows + k0 + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + k0 + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    dst = out_ptr + rows[:, None] * stride_om + cols[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def skinny_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor | None = None,
    config: SkinnyConfig | None = None,
) -> torch.Tensor:
    """``x @ weight.T`` (``F.linear`` without a bias) for ``x`` of at most ``MAX_ROWS`` rows;
    ``weight`` [N, K] with unit last stride, K a multiple of 64 (every model's hidden size)."""
    checks.check_device(x=x, weight=weight)
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x [M, K] and weight [N, K] expected, got {list(x.shape)} and "
                         f"{list(weight.shape)}")  # fmt: skip
    m, k = x.shape
    n = weight.shape[0]
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"x has {m} rows; this kernel takes 1 to {MAX_ROWS}")
    if k % 64:
        raise ValueError(f"in_features {k} is not a multiple of 64")
    if x.dtype != weight.dtype:
        raise ValueError(f"x is {x.dtype} but weight is {weight.dtype}")
    checks.check_unit_last_stride("x", x)
    checks.check_unit_last_stride("weight", weight)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or out.stride(1) != 1:
        raise ValueError(f"out must be [{m}, {n}] {x.dtype} with unit last stride")
    config = config or SkinnyConfig()
    block_k = min(config.block_k, triton.next_power_of_2(k))
    _skinny_matmul_kernel[(triton.cdiv(n, config.block_n),)](
        x, weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=16, BLOCK_N=config.block_n, BLOCK_K=block_k,
        PREFETCH_STEPS=min(config.prefetch_steps, k // block_k),
        PREFETCH=x.device.type == "cuda" and config.prefetch_steps > 0,
        num_warps=config.num_warps, num_stages=config.num_stages,
        **checks.launch_options(x.device),
    )  # fmt: skip
    return out
