"""``x @ weight.T`` for a few rows: a decode step's linears, streamed at the read rate.

At a decode batch of 64 the Llama-3-8B step reads 15 GB of weights for 64 rows of activations;
every linear is bound by reading its weight once, and cuBLAS's kernels for these shapes run at
86-88 % of the H100's measured read rate (``benchmarks/linears.py``). This kernel swaps the
operands (``y.T = weight @ x.T``): each program streams one [BLOCK_N, BLOCK_K] weight tile after
another by TMA, as the tensor cores' large operand, against the few rows of ``x`` (padded to
``BLOCK_M``, at least 16) as the small one.

Splitting K gives a short matrix (``N`` of 4,096) enough programs to keep every SM reading. The
split's partial sums go to a float32 workspace and the last program of an output tile to arrive
(an acquire-release counter per tile) adds them in split order and stores the tile, so the result
is the same bit for bit on every run (no atomics on the output), and the counter is back at zero
for the next launch or graph replay.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def _skinny_linear_kernel(  # type: ignore[no-untyped-def]  # Triton kernel: pointer args
    w_desc,  # TMA descriptor of weight [N, K], box [BLOCK_N, BLOCK_K]
    x_desc,  # TMA descriptor of x [M, K], box [BLOCK_M, BLOCK_K]
    y_desc,  # TMA descriptor of the output y [M, N], box [BLOCK_M, BLOCK_N]
    part_ptr,  # [SPLIT_K, N tiles, BLOCK_N, BLOCK_M] float32 partial sums (SPLIT_K > 1)
    count_ptr,  # [N tiles] int32, zero before and after the launch (SPLIT_K > 1)
    k_per_split,  # a multiple of BLOCK_K
    num_k_steps,  # k_per_split // BLOCK_K
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    k0 = pid_k * k_per_split
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y.T's tile
    for i in tl.range(0, num_k_steps, num_stages=NUM_STAGES):
        k = k0 + i * BLOCK_K  # past K, TMA reads zeros
        w = w_desc.load([n0, k])  # [BLOCK_N, BLOCK_K]
        x = x_desc.load([0, k])  # [BLOCK_M, BLOCK_K]
        acc = tl.dot(w, x.T, acc)
    if SPLIT_K == 1:
        y_desc.store([0, n0], tl.trans(acc).to(y_desc.dtype))  # rows past M are not written
    else:
        # This split's [BLOCK_N, BLOCK_M] sums, whole (past M and N they are zeros), at
        # offsets the compiler knows: no per-element addresses or masks.
        tile = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        split_stride = tl.num_programs(0) * BLOCK_N * BLOCK_M
        part = part_ptr + pid_n * BLOCK_N * BLOCK_M + tile
        tl.store(part + pid_k * split_stride, acc)
        # Release: this split's sums are visible before the count says so; the last to arrive
        # acquires them all.
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for s in range(SPLIT_K):  # a loop, not unrolled: one partial tile live at a time
                total += tl.load(part + s * split_stride, cache_modifier=".cg")
            y_desc.store([0, n0], tl.trans(total).to(y_desc.dtype))
            tl.atomic_xchg(count_ptr + pid_n, 0)


@dataclasses.dataclass(frozen=True)
class SkinnyConfig:
    """A launch: tile sizes, the K split (``None``: enough programs for every SM), pipeline."""

    block_n: int = 128
    block_k: int = 128
    split_k: int | None = None
    num_stages: int = 4
    num_warps: int = 4


MAX_ROWS = 128  # past this the linears are bound by FLOPs, cuBLAS's ground


def block_m(rows: int) -> int:
    """The padded row count: a power of two, at least the tensor cores' 16."""
    return max(16, triton.next_power_of_2(rows))


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel can take this product: at most ``MAX_ROWS`` rows, 16-bit floats,
    and rows TMA can address (unit stride, 16-byte aligned), the output's too."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[0] > MAX_ROWS or x.shape[0] == 0:
        return False
    if x.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
        return False
    return _tma_rows(x) and _tma_rows(weight) and (weight.shape[0] * x.element_size()) % 16 == 0


def _tma_rows(t: torch.Tensor) -> bool:
    """Rows TMA can address: unit stride, a 16-byte aligned start and row pitch."""
    return (
        t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
    )


def split_for(n: int, k: int, config: SkinnyConfig, num_sms: int) -> int:
    """The configured split, else the smallest power of two that gives every SM a program
    (at most one split per ``BLOCK_K`` step)."""
    if config.split_k is not None:
        return config.split_k
    tiles = triton.cdiv(n, config.block_n)
    steps = triton.cdiv(k, config.block_k)
    split = 1
    while tiles * split < num_sms and split * 2 <= steps:
        split *= 2
    return split


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: small splits still exercised
    return torch.cuda.get_device_properties(device).multi_processor_count


_counters: dict[torch.device, torch.Tensor] = {}


def tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """The per-tile arrival counters, one zeroed buffer per device, kept for the process (a
    CUDA graph holds its address; every launch leaves it zeroed)."""
    buf = _counters.get(device)
    if buf is None or buf.numel() < tiles:
        buf = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        _counters[device] = buf
    return buf


def _descriptor(t: torch.Tensor, box: list[int]) -> TensorDescriptor:
    return TensorDescriptor(base=t, shape=list(t.shape), strides=list(t.stride()), block_shape=box)


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor | None = None,
    config: SkinnyConfig | None = None,
) -> torch.Tensor:
    """``x @ weight.T`` ([M, K] x [N, K] -> [M, N]), for ``supports(x, weight)``."""
    if not supports(x, weight):
        raise ValueError(
            f"skinny_linear takes at most {MAX_ROWS} rows of fp16/bf16 with unit-stride, "
            f"16-byte aligned rows; got x {tuple(x.shape)} {x.dtype} strides {x.stride()}, "
            f"weight {tuple(weight.shape)} {weight.dtype} strides {weight.stride()}"
        )
    config = config or SkinnyConfig()
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"x has {k} columns, weight {weight.shape[1]}")
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or not _tma_rows(out):
        raise ValueError(f"out must be [{m}, {n}] {x.dtype} with unit-stride, 16-byte aligned rows")
    bm = block_m(m)
    split = split_for(n, k, config, _num_sms(x.device))
    steps = triton.cdiv(triton.cdiv(k, config.block_k), split)
    k_per_split = steps * config.block_k
    split = triton.cdiv(k, k_per_split)  # no empty splits
    tiles = triton.cdiv(n, config.block_n)
    if split > 1:
        part = torch.empty(split, tiles, config.block_n, bm, dtype=torch.float32, device=x.device)
        counters = tile_counters(x.device, tiles)
    else:
        part = counters = out  # unused
    _skinny_linear_kernel[(tiles, split)](
        _descriptor(weight, [config.block_n, config.block_k]),
        _descriptor(x, [bm, config.block_k]),
        _descriptor(out, [bm, config.block_n]),
        part,
        counters,
        k_per_split,
        steps,
        BLOCK_M=bm,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        SPLIT_K=split,
        NUM_STAGES=config.num_stages,
        num_warps=config.num_warps,
    )
    return out


def launch_for(rows: int, n: int, k: int) -> SkinnyConfig | None:
    """The launch for a ``rows`` x ``k`` by ``n`` x ``k`` product where this kernel beats cuBLAS,
    else None (cuBLAS keeps it)."""
    if rows > MAX_ROWS:
        return None
    return SkinnyConfig()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, except that a few-row product on the GPU goes to the skinny kernel where
    ``launch_for`` says it is faster. Decided when a CUDA graph captures the call: its rows are
    the graph's batch size."""
    if bias is None and x.is_cuda and supports(x, weight):
        config = launch_for(x.shape[0], weight.shape[0], weight.shape[1])
        if config is not None:
            return skinny_linear(x, weight, config=config)
    return F.linear(x, weight, bias)
