"""``x @ w.T`` for a few rows of ``x`` (a decode step's linears at batch 1-16), bandwidth-first.

At a few rows a linear only streams its weight: the floor is the weight's bytes over the HBM
read rate. cuBLAS reaches 85-100 % of it on the large matrices of a decode step, but 60-76 % on
the small ones (Llama-3-8B's QKV, 50 MB, and O, 34 MB, on an H200:
``benchmarks/results/blas-tuning-h200.md``), a fixed cost per kernel of a few microseconds.
This kernel does better there (H100, ``benchmarks/results/skinny-matmul-h100-20261207.json``:
O 81 % against 71 %, QKV 86 % against 82 %, down 93-94 % against 89-91 %; gate/up ties; on an
H200 QKV 1.03-1.09x and O 1.08-1.12x cuBLAS, ``skinny-matmul-h200-20261207.md``): one
program owns ``BLOCK_N`` output columns over all of K in ``BLOCK_K`` steps, four in flight, the
rows padded to 16 for the tensor cores, and it is launched as a programmatic dependent (PDL), so
it starts while the kernel before it finishes. The engine captures it into a decode graph only
for the linears it measured faster at start-up (``blas_choice.choose_skinny``).
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
    """Launch shape: output columns per program, K per step, Triton's knobs. The default was the
    fastest of a grid for O and down (H100 sweep; asking L2 for the first weight steps before
    the PDL wait, ``prefetch.global.L2``, won nowhere and was dropped)."""

    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4


# What the engine tries per kind of projection at start-up: the default, shorter K steps (QKV's
# best on the H100) and wider column tiles over three stages (gate/up's).
CANDIDATES = (SkinnyConfig(), SkinnyConfig(block_k=128), SkinnyConfig(block_n=64, num_stages=3))


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
    PDL: tl.constexpr = False,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
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
    if x.dtype != weight.dtype or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"x and weight must both be bf16 or fp16, got {x.dtype}, {weight.dtype}")
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
        num_warps=config.num_warps, num_stages=config.num_stages,
        **checks.launch_options(x.device),
    )  # fmt: skip
    return out
