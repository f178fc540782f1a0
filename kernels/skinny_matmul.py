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
    sums_ptr,  # NORM: [num_sums, MAX_ROWS] float32, x's squared row sums in parts
    num_sums,
    eps,
    residual_ptr,  # RESIDUAL: [M, N]
    stride_rm,
    sums_out_ptr,  # RESIDUAL: [programs, MAX_ROWS] float32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NORM: tl.constexpr = False,  # x is a residual stream: the product scaled by x's RMSNorm
    SUMS_PAD: tl.constexpr = 1,  # num_sums rounded up to a power of two
    RESIDUAL: tl.constexpr = False,  # out = residual + x @ w.T, and its squared sums
    PDL: tl.constexpr = False,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    if PDL:  # x (and the sums, the residual) are the kernel before's output
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
    mask = row_ok[:, None] & col_ok[None, :]
    if NORM:  # a row's RMSNorm is one scale of its product (the norm's weight is in w)
        parts = tl.arange(0, SUMS_PAD)
        sums = tl.load(sums_ptr + parts[:, None] * BLOCK_M + rows[None, :],
                       mask=(parts < num_sums)[:, None] & row_ok[None, :], other=0.0)  # fmt: skip
        acc = acc * tl.math.rsqrt(tl.sum(sums, axis=0) / K + eps)[:, None]
    out = acc.to(out_ptr.dtype.element_ty)
    if RESIDUAL:  # rounded as PyTorch rounds ``residual + x @ w.T`` in the model's type
        residual = tl.load(residual_ptr + rows[:, None] * stride_rm + cols[None, :], mask=mask,
                           other=0.0)  # fmt: skip
        out = (out.to(tl.float32) + residual.to(tl.float32)).to(out_ptr.dtype.element_ty)
        squares = out.to(tl.float32)
        squares = tl.where(mask, squares * squares, 0.0)
        tl.store(sums_out_ptr + pid * BLOCK_M + rows, tl.sum(squares, axis=1))
    dst = out_ptr + rows[:, None] * stride_om + cols[None, :]
    tl.store(dst, out, mask=mask)


def skinny_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor | None = None,
    config: SkinnyConfig | None = None,
) -> torch.Tensor:
    """``x @ weight.T`` (``F.linear`` without a bias) for ``x`` of at most ``MAX_ROWS`` rows;
    ``weight`` [N, K] with unit last stride, K a multiple of 64 (every model's hidden size)."""
    _, n = _check(x, weight)
    out = _output(x, n, out)
    _launch(x, weight, out, config)
    return out


def skinny_matmul_add(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor,
    config: SkinnyConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual + x @ weight.T`` (a layer's output added to the residual stream, as a new
    tensor) and its squared row sums in parts, float32 [programs, MAX_ROWS], one part per
    program's columns: the statistics of the RMSNorm that follows, which
    ``skinny_matmul_normed`` sums, so that no separate kernel reads the stream for them."""
    m, n = _check(x, weight)
    if residual.shape != (m, n) or residual.dtype != x.dtype or residual.stride(1) != 1:
        raise ValueError(f"residual must be [{m}, {n}] {x.dtype} with unit last stride, got "
                         f"{list(residual.shape)} {residual.dtype}")  # fmt: skip
    config = config or SkinnyConfig()
    sums = torch.empty((triton.cdiv(n, config.block_n), MAX_ROWS), dtype=torch.float32,
                       device=x.device)  # fmt: skip
    out = _output(x, n, None)
    _launch(x, weight, out, config, residual=residual, residual_stride=residual.stride(0),
            sums_out=sums, RESIDUAL=True)  # fmt: skip
    return out, sums


def skinny_matmul_normed(
    x: torch.Tensor,
    sums: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    config: SkinnyConfig | None = None,
) -> torch.Tensor:
    """``rms_norm(x) @ weight.T``, the RMSNorm without a weight of its own (the model folds the
    norm's weight into the projection's, ``CausalLM.fold_norms``), ``sums`` (from
    ``skinny_matmul_add``) x's squared row sums in parts. A row's norm is then one scale of its
    product, applied to the fp32 accumulator: the loop over K is the plain product's (scaling
    x as it loads doubled the loop's instructions and made the kernel issue-bound)."""
    _, n = _check(x, weight)
    if sums.dim() != 2 or sums.shape[1] != MAX_ROWS or sums.dtype != torch.float32:
        raise ValueError(f"sums must be float32 [parts, {MAX_ROWS}], got {list(sums.shape)} "
                         f"{sums.dtype}")  # fmt: skip
    checks.check_device(x=x, sums=sums)
    out = _output(x, n, None)
    _launch(x, weight, out, config, sums=sums.contiguous(), num_sums=sums.shape[0], eps=eps,
            NORM=True, SUMS_PAD=triton.next_power_of_2(sums.shape[0]))  # fmt: skip
    return out


def _check(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, int]:
    checks.check_device(x=x, weight=weight)
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x [M, K] and weight [N, K] expected, got {list(x.shape)} and "
                         f"{list(weight.shape)}")  # fmt: skip
    m, k = x.shape
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"x has {m} rows; this kernel takes 1 to {MAX_ROWS}")
    if k % 64:
        raise ValueError(f"in_features {k} is not a multiple of 64")
    if x.dtype != weight.dtype or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"x and weight must both be bf16 or fp16, got {x.dtype}, {weight.dtype}")
    checks.check_unit_last_stride("x", x)
    checks.check_unit_last_stride("weight", weight)
    return m, weight.shape[0]


def _output(x: torch.Tensor, n: int, out: torch.Tensor | None) -> torch.Tensor:
    m = x.shape[0]
    if out is None:
        return torch.empty((m, n), dtype=x.dtype, device=x.device)
    if out.shape != (m, n) or out.dtype != x.dtype or out.stride(1) != 1:
        raise ValueError(f"out must be [{m}, {n}] {x.dtype} with unit last stride")
    return out


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
    config: SkinnyConfig | None,
    sums: torch.Tensor | None = None,
    num_sums: int = 0,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
    residual_stride: int = 0,
    sums_out: torch.Tensor | None = None,
    **flags: int | bool,
) -> None:
    m, k = x.shape
    n = weight.shape[0]
    config = config or SkinnyConfig()
    block_k = min(config.block_k, triton.next_power_of_2(k))
    _skinny_matmul_kernel[(triton.cdiv(n, config.block_n),)](
        x, weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        x if sums is None else sums, num_sums, eps,
        x if residual is None else residual, residual_stride,
        x if sums_out is None else sums_out,
        BLOCK_M=MAX_ROWS, BLOCK_N=config.block_n, BLOCK_K=block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
        **flags, **checks.launch_options(x.device),
    )  # fmt: skip
