"""Ask L2 to hold a tensor before the kernel that reads it runs (a decode step's O projection).

In a decode step at a few rows, the small projections run below the HBM read rate: a fixed
cost per kernel of a few microseconds while their programs ramp up and drain (Llama-3-8B's O
weight, 34 MB, reads at 70 % of the rate on an H200, ``skinny-matmul-h200-20261207.md``).
Between the QKV and O projections the step runs RoPE and attention, which at a few rows read
little and leave HBM idle. This kernel fills that gap: it issues L2 prefetches for the O
weight, which the memory system serves while attention runs, so the O projection then reads
from L2 (50 MB on Hopper). No data reaches the SMs: ``cp.async.bulk.prefetch.L2`` (TMA, sm_90)
asks for a whole chunk per instruction, ``prefetch.global.L2`` one 128-byte line.

Launched as a programmatic dependent, the kernel may issue its prefetches as soon as it starts
(``early``: while the kernel before it still streams its own weight) or after that kernel's
results are visible; either way it waits for them before it ends, so the kernel after it, which
waits only on this one, still sees them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from berth.kernels import checks

LINE = 128  # bytes per L2 line


@dataclass(frozen=True)
class PrefetchConfig:
    """``bulk``: one TMA prefetch of ``chunk`` bytes per thread, else one ``prefetch`` per line;
    ``early``: prefetch before waiting for the kernel before (see the module's docstring)."""

    bulk: bool = True
    chunk: int = 16384
    early: bool = False
    threads_per_program: int = 128


@triton.jit
def _prefetch_line(ptrs):  # type: ignore[no-untyped-def]
    return tl.inline_asm_elementwise(
        "prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;",
        "=r,l",
        [ptrs],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _prefetch_bulk(ptrs, sizes):  # type: ignore[no-untyped-def]
    return tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;",
        "=r,l,r",
        [ptrs, sizes],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _l2_prefetch_kernel(  # type: ignore[no-untyped-def]  # Triton kernel: pointer args
    data_ptr,  # uint8 view of the tensor
    last_offset,  # byte offset of the last whole chunk
    CHUNK: tl.constexpr,
    PER_PROGRAM: tl.constexpr,
    BULK: tl.constexpr,
    EARLY: tl.constexpr,
    PDL: tl.constexpr = False,
):
    if PDL:
        if not EARLY:
            gdc_wait()
        gdc_launch_dependents()
    chunks = tl.program_id(0) * PER_PROGRAM + tl.arange(0, PER_PROGRAM)
    # Chunks past the end ask for the last one again (an inline asm takes no mask).
    offsets = tl.minimum(chunks.to(tl.int64) * CHUNK, last_offset)
    if BULK:
        done = _prefetch_bulk(data_ptr + offsets, tl.full([PER_PROGRAM], CHUNK, tl.int32))
    else:
        done = _prefetch_line(data_ptr + offsets)
    if PDL and EARLY:  # this grid ends after the one before it, as the next kernel expects
        gdc_wait()
    if tl.sum(done) != 0:  # never: keeps the asm's result live
        tl.store(data_ptr + offsets, done.to(tl.uint8))


def l2_prefetch(tensor: torch.Tensor, config: PrefetchConfig | None = None) -> None:
    """Ask L2 for ``tensor``'s bytes (contiguous, on a GPU); returns at once. The bytes past
    the last whole chunk (or line) are left out."""
    config = config or PrefetchConfig()
    checks.check_device(tensor=tensor)
    if checks.interpreting():
        return  # the interpreter has no cache to fill
    if not tensor.is_contiguous():
        raise ValueError("l2_prefetch needs a contiguous tensor")
    chunk = config.chunk if config.bulk else LINE
    if chunk % 16 or chunk <= 0:
        raise ValueError(f"chunk must be a positive multiple of 16 bytes, got {chunk}")
    data = tensor.view(-1).view(torch.uint8)
    num_chunks = data.numel() // chunk
    if num_chunks == 0:
        return
    per_program = config.threads_per_program
    _l2_prefetch_kernel[(triton.cdiv(num_chunks, per_program),)](
        data, (num_chunks - 1) * chunk,
        CHUNK=chunk, PER_PROGRAM=per_program, BULK=config.bulk, EARLY=config.early,
        num_warps=max(1, per_program // 32), **checks.launch_options(tensor.device),
    )  # fmt: skip
