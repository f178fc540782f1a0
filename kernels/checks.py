"""Argument checks shared by the kernel launchers.

A Triton kernel given a wrong shape, dtype or stride does not fail: it reads or writes the wrong
memory. So every launcher checks its inputs first and raises ``ValueError`` (shape, stride,
device) or ``TypeError`` (dtype) naming the argument and what was expected. The checks read only
tensor metadata, never values, so they cost no device sync and are safe under CUDA-graph capture.
"""

from __future__ import annotations

import os

import torch

ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8 = torch.float8_e4m3fn  # the quantized KV cache's element type
CACHE_DTYPES = (*ATTENTION_DTYPES, FP8)
INDEX_DTYPES = (torch.int32,)


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``), as in CI."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def programmatic_launch(device: torch.device) -> bool:
    """Whether to launch the decode path's kernels with programmatic dependent launch: on Hopper
    and later unless ``BERTH_PDL=0``. A kernel's programs start while the one before it drains
    and wait at ``gdc_wait`` for its results; the runner then has torch.compile's pointwise
    kernels launched so too. Measured: decode steps 0.8 % (batch 64) to 1.4 % (batch 1) shorter
    on an H100 (engine-pdl-h100.md), 2.4 % at batch 1 on an H200 (engine-pdl-h200.md), where
    the engine's GPU tests pass under it (107)."""
    if os.environ.get("BERTH_PDL", "1") == "0" or interpreting() or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def launch_options(device: torch.device) -> dict[str, bool]:
    """Extra launch arguments of a decode-path kernel with a ``PDL`` constexpr: the constexpr
    and Triton's ``launch_pdl`` when ``programmatic_launch``, else none."""
    return {"PDL": True, "launch_pdl": True} if programmatic_launch(device) else {}


def check_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one device, and that device a GPU unless the interpreter is on."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n}={d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    if first.type != "cuda" and not interpreting():
        raise ValueError(
            f"Triton kernels need CUDA tensors, got {first}; use berth.kernels.reference on the CPU"
        )
    return first


def check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")


def check_same_dtype(**tensors: torch.Tensor) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{n}={d}" for n, d in dtypes.items())
        raise TypeError(f"tensors must share one dtype, got {listing}")


def check_shape(name: str, t: torch.Tensor, expected: tuple[int | None, ...], what: str) -> None:
    """``expected`` holds a size per dim, ``None`` for any; ``what`` names the dims for the message."""
    ok = t.dim() == len(expected) and all(
        e is None or s == e for s, e in zip(t.shape, expected, strict=True)
    )
    if not ok:
        want = ", ".join("*" if e is None else str(e) for e in expected)
        raise ValueError(f"{name} must be {what} = [{want}], got {list(t.shape)}")


def check_unit_last_stride(name: str, t: torch.Tensor) -> None:
    """Kernels vectorise along the last dim; every other dim may have any stride."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous in its last dim (stride 1), got strides {t.stride()}"
        )


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")


def check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """Both caches [num_blocks, block_size, Hkv, D], same shape and dtype; returns the dims."""
    if k_cache.dim() != 4:
        raise ValueError(
            "k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {list(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache must have k_cache's shape {list(k_cache.shape)}, got {list(v_cache.shape)}"
        )
    check_dtype("k_cache", k_cache, CACHE_DTYPES)
    check_same_dtype(k_cache=k_cache, v_cache=v_cache)
    check_unit_last_stride("k_cache", k_cache)
    check_unit_last_stride("v_cache", v_cache)
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    return num_blocks, block_size, num_kv_heads, head_dim


def check_attention_dims(num_heads: int, num_kv_heads: int, head_dim: int) -> int:
    """Query heads a multiple of KV heads; head_dim a power of two >= 16. Returns the group size."""
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"query heads ({num_heads}) must be a multiple of the cache's KV heads ({num_kv_heads})"
        )
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    return num_heads // num_kv_heads


def check_out(out: torch.Tensor, like: torch.Tensor) -> None:
    """A caller-supplied output: the query's shape, dtype and device, unit last stride."""
    if out.shape != like.shape:
        raise ValueError(
            f"out must have the query's shape {list(like.shape)}, got {list(out.shape)}"
        )
    if out.dtype != like.dtype:
        raise TypeError(f"out must have the query's dtype {like.dtype}, got {out.dtype}")
    check_unit_last_stride("out", out)


def check_fp8_capability(capability: tuple[int, int]) -> None:
    """An FP8 (e4m3) cache needs compute capability 8.9 or later: below it Triton has no e4m3
    type, and every kernel reading the cache would fail to compile at the first step."""
    if capability < (8, 9):
        major, minor = capability
        raise ValueError(
            "kv_cache_dtype fp8 needs a GPU of compute capability 8.9 or later (Ada, Hopper or "
            f"newer); this one is {major}.{minor}: use kv_cache_dtype auto"
        )


def check_cache_scales(
    k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
) -> bool:
    """An FP8 cache needs its per-token, per-head float32 scales [num_blocks, block_size, Hkv]
    (unit last stride) on its device; any other cache takes none. True for FP8."""
    if k_cache.dtype != FP8:
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"k_scale/v_scale go with an FP8 cache, not {k_cache.dtype}")
        return False
    if k_scale is None or v_scale is None:
        raise ValueError("an FP8 cache needs k_scale and v_scale [num_blocks, block_size, Hkv]")
    want = tuple(k_cache.shape[:3])
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        check_shape(name, t, want, "[num_blocks, block_size, num_kv_heads]")
        check_dtype(name, t, (torch.float32,))
        check_unit_last_stride(name, t)
        if t.device != k_cache.device:
            raise ValueError(
                f"{name} must be on the cache's device {k_cache.device}, got {t.device}"
            )
    return True


def scale_strides(k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> tuple[int, ...]:
    """(block, slot) strides of k_scale then v_scale; zeros without scales."""
    if k_scale is None or v_scale is None:
        return (0, 0, 0, 0)
    return (k_scale.stride(0), k_scale.stride(1), v_scale.stride(0), v_scale.stride(1))


def check_query_and_cache(query: torch.Tensor, k_cache: torch.Tensor) -> None:
    """The cache holds the query's dtype, or FP8 (dequantized to the query's dtype)."""
    check_dtype("query", query, ATTENTION_DTYPES)
    if k_cache.dtype != FP8:
        check_same_dtype(query=query, k_cache=k_cache)
