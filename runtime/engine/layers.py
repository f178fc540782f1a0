"""The decoder's pointwise pieces (RMSNorm, residual add, RoPE, SiLU-and-mul) as plain functions.

Eager, each is a handful of small kernels; a decode step at batch 1 runs about 35 of them per
layer, and on the GPU their launch gaps cost more than the weights take to stream. So on the
GPU ``Pointwise.compiled()`` hands them to ``torch.compile``, which fuses each function into
one or two kernels that the decode CUDA graphs then capture (RoPE there goes further, into
the cache write: ``berth.kernels.rope_write_kv_cache``). The CPU keeps the eager versions:
their arithmetic is Hugging Face's, operation for operation, which the equality tests rely on.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's RMSNorm: statistics in fp32, scale applied in the input dtype."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual + x`` (the new residual stream) and its norm, in one pass when compiled."""
    h = residual + x
    return rms_norm(h, weight, eps), h


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [T, Hq, D] and k [T, Hkv, D] with cos/sin [T, D]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3: per-head RMSNorm of q and k, then RoPE."""
    return rope(rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps), cos, sin)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@dataclass
class Pointwise:
    """The pointwise functions a model calls; eager by default, fused by ``compiled()``."""

    rms_norm: Callable[..., Any] = rms_norm
    add_rms_norm: Callable[..., Any] = add_rms_norm
    rope: Callable[..., Any] = rope
    qk_norm_rope: Callable[..., Any] = qk_norm_rope
    silu_and_mul: Callable[..., Any] = silu_and_mul
    is_compiled: bool = False

    @staticmethod
    def compiled() -> Pointwise:
        def fuse(fn: Callable[..., Any]) -> Callable[..., Any]:
            return torch.compile(fn, dynamic=True, fullgraph=True)

        return Pointwise(
            fuse(rms_norm),
            fuse(add_rms_norm),
            fuse(rope),
            fuse(qk_norm_rope),
            fuse(silu_and_mul),
            is_compiled=True,
        )

    def use_eager(self) -> None:
        """Fall back to the eager functions (in place: every layer shares this object)."""
        eager = Pointwise()
        for name in FUNCTIONS:
            setattr(self, name, getattr(eager, name))
        self.is_compiled = False

    @contextlib.contextmanager
    def eager_for_now(self) -> Iterator[None]:
        """The eager functions inside the block, the current ones after it."""
        saved = {name: getattr(self, name) for name in FUNCTIONS}
        compiled = self.is_compiled
        self.use_eager()
        try:
            yield
        finally:
            for name, fn in saved.items():
                setattr(self, name, fn)
            self.is_compiled = compiled


FUNCTIONS = ("rms_norm", "add_rms_norm", "rope", "qk_norm_rope", "silu_and_mul")
