"""The decoder's projections, whose products of a few rows can run the skinny kernel.

A decode step at batch 1-16 multiplies a handful of rows by each weight: the weight's bytes set
the time. cuBLAS streams the large weights at 90-100 % of the read rate but the small ones at
60-80 %; ``berth.kernels.skinny_matmul`` does better on some (``kernels/skinny_matmul.py``).
Which kernel wins depends on the card, the shape and the row count, so the runner measures both
at start-up for each kind of projection and decode batch size (``blas_choice.choose_skinny``)
and gives the kinds that won their fastest launch config (``skinny``) while it captures that
size's graph. Eager steps and anything above ``MAX_ROWS`` rows, or with a bias, stay on
``nn.Linear``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from berth.kernels.skinny_matmul import SkinnyConfig

# The skinny kernel's row limit (kernels/skinny_matmul.py), repeated here so that importing the
# model does not import Triton.
MAX_ROWS = 16


class DecodeLinear(nn.Linear):
    """``nn.Linear`` with a ``kind`` (the projection it is in every layer: qkv, o, gate_up,
    down) and a ``skinny`` launch config the runner sets while capturing a decode graph (None:
    ``nn.Linear``). With ``fuse_norms`` also set, a layer hands the RMSNorm between two such
    projections to the kernel: the first adds its output to the residual stream and sums its
    squares (``add``), the second scales its product by each row's 1/rms, the norm's weight
    folded into its own (``normed``); see ``fuses_norm``."""

    def __init__(self, kind: str, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.kind = kind
        self.skinny: SkinnyConfig | None = None
        self.fuse_norms = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        config = self.skinny
        if config is not None and self.bias is None and x.dim() == 2 and x.shape[0] <= MAX_ROWS:
            from berth.kernels.skinny_matmul import skinny_matmul

            return skinny_matmul(x, self.weight, config=config)
        return super().forward(x)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual + self(x)`` as a new tensor, and its squared row sums in parts (what
        ``normed`` takes); only where ``fuses_norm`` said so."""
        from berth.kernels.skinny_matmul import skinny_matmul_add

        return skinny_matmul_add(x, self.weight, residual, self.skinny)

    def normed(self, x: torch.Tensor, sums: torch.Tensor, eps: float) -> torch.Tensor:
        """``self(rms_norm(x))`` with x's squared sums from ``add``, for a projection whose
        weight holds the norm's (``CausalLM.fold_norms``)."""
        from berth.kernels.skinny_matmul import skinny_matmul_normed

        return skinny_matmul_normed(x, sums, eps, self.weight, self.skinny)


def fuses_norm(producer: DecodeLinear, consumer: DecodeLinear, rows: int) -> bool:
    """Whether the RMSNorm between ``producer``'s output (added to the residual stream) and
    ``consumer``'s input runs inside the skinny kernel: both run it, with norms fused, and the
    step has at most ``MAX_ROWS`` rows."""
    return rows <= MAX_ROWS and all(
        p.skinny is not None and p.fuse_norms and p.bias is None for p in (producer, consumer)
    )


def by_kind(model: nn.Module) -> dict[str, list[DecodeLinear]]:
    """The model's projections that can run the skinny kernel, grouped by kind, in layer order
    (one with a bias never does)."""
    kinds: dict[str, list[DecodeLinear]] = {}
    for module in model.modules():
        if isinstance(module, DecodeLinear) and module.bias is None:
            kinds.setdefault(module.kind, []).append(module)
    return kinds


@contextlib.contextmanager
def skinny(
    projections: Mapping[str, Sequence[DecodeLinear]],
    configs: Mapping[str, SkinnyConfig],
    fuse_norms: bool = False,
) -> Iterator[None]:
    """The projections of each kind in ``configs`` run the skinny kernel with its config inside
    the block (a decode graph's capture), with the RMSNorms between two of them fused into it
    if ``fuse_norms``; every projection runs ``nn.Linear`` after it."""
    for kind, modules in projections.items():
        for module in modules:
            module.skinny = configs.get(kind)
            module.fuse_norms = fuse_norms
    try:
        yield
    finally:
        for modules in projections.values():
            for module in modules:
                module.skinny = None
                module.fuse_norms = False
