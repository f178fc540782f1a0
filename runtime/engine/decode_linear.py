"""The decoder's projections, whose products of a few rows can run the skinny kernel.

A decode step at batch 1-16 multiplies a handful of rows by each weight: the weight's bytes set
the time. cuBLAS streams the large weights at 90-100 % of the read rate but the small ones at
60-80 %; ``berth.kernels.skinny_matmul`` does better on some (``kernels/skinny_matmul.py``).
Which kernel wins depends on the card, the shape and the row count, so the runner measures both
at start-up for each kind of projection and decode batch size (``blas_choice.choose_skinny``)
and turns ``skinny`` on for the kinds that won while it captures that size's graph. Eager steps
and anything above ``MAX_ROWS`` rows, or with a bias, stay on ``nn.Linear``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Mapping, Sequence

import torch
from torch import nn

# The skinny kernel's row limit (kernels/skinny_matmul.py), repeated here so that importing the
# model does not import Triton.
MAX_ROWS = 16


class DecodeLinear(nn.Linear):
    """``nn.Linear`` with a ``kind`` (the projection it is in every layer: qkv, o, gate_up,
    down) and a ``skinny`` switch the runner sets while capturing a decode graph."""

    def __init__(self, kind: str, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.kind = kind
        self.skinny = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.skinny and self.bias is None and x.dim() == 2 and x.shape[0] <= MAX_ROWS:
            from berth.kernels.skinny_matmul import skinny_matmul

            return skinny_matmul(x, self.weight)
        return super().forward(x)


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
    projections: Mapping[str, Sequence[DecodeLinear]], kinds: Collection[str]
) -> Iterator[None]:
    """The projections of ``kinds`` run the skinny kernel inside the block (a decode graph's
    capture), every projection runs ``nn.Linear`` after it."""
    for kind, modules in projections.items():
        for module in modules:
            module.skinny = kind in kinds
    try:
        yield
    finally:
        for modules in projections.values():
            for module in modules:
                module.skinny = False
