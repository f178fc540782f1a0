"""The skinny matmul (a decode step's linears at a few rows) against ``F.linear``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from berth.kernels.skinny_matmul import (
    MAX_ROWS,
    SkinnyConfig,
    skinny_matmul,
    skinny_matmul_add,
    skinny_matmul_normed,
)
from berth.runtime.engine.layers import add_rms_norm

SMALL = SkinnyConfig(block_n=16, block_k=64)


@pytest.mark.parametrize("rows", [1, 3, MAX_ROWS])
@pytest.mark.parametrize(("n", "k"), [(64, 128), (70, 192), (16, 64)])
def test_matches_linear(device: torch.device, rows: int, n: int, k: int) -> None:
    """Any row count up to the limit, N not a multiple of the tile, K several steps or one."""
    torch.manual_seed(rows * n + k)
    x = torch.randn(rows, k, dtype=torch.float16, device=device)
    w = torch.randn(n, k, dtype=torch.float16, device=device)
    out = torch.full((rows, n), float("nan"), dtype=torch.float16, device=device)
    skinny_matmul(x, w, out, SMALL)
    torch.testing.assert_close(out, F.linear(x, w), atol=2e-2, rtol=1e-2)


def test_strided_rows(device: torch.device) -> None:
    """x and w as row views of larger tensors (a fused projection's slices)."""
    x = torch.randn(4, 256, dtype=torch.float16, device=device)[:, :128]
    w = torch.randn(48, 256, dtype=torch.float16, device=device)[:, 64:192]
    torch.testing.assert_close(skinny_matmul(x, w, config=SMALL), F.linear(x, w),
                               atol=2e-2, rtol=1e-2)  # fmt: skip


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "message"),
    [
        ((MAX_ROWS + 1, 64), (8, 64), "rows"),
        ((2, 96), (8, 96), "multiple of 64"),
        ((2, 64), (8, 128), "expected"),
    ],
)
def test_rejects_bad_shapes(
    device: torch.device, x_shape: tuple[int, int], w_shape: tuple[int, int], message: str
) -> None:
    x = torch.randn(*x_shape, dtype=torch.float16, device=device)
    w = torch.randn(*w_shape, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match=message):
        skinny_matmul(x, w)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 8, 16])
def test_llama_shapes_on_gpu(device: torch.device, rows: int) -> None:
    for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]:
        x = torch.randn(rows, k, dtype=torch.bfloat16, device=device)
        w = torch.randn(n, k, dtype=torch.bfloat16, device=device) * 0.02
        torch.testing.assert_close(skinny_matmul(x, w), F.linear(x, w), atol=2e-2, rtol=2e-2)


def test_rejects_float32(device: torch.device) -> None:
    """fp32 would run the tensor cores in TF32: refused rather than silently less exact."""
    x, w = torch.randn(2, 64, device=device), torch.randn(8, 64, device=device)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        skinny_matmul(x, w)


# bf16 on the GPU only: the CPU interpreter's bf16 dot is wrong (a plain product too)
@pytest.mark.parametrize(
    "dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
)
@pytest.mark.parametrize("rows", [1, 5, MAX_ROWS])
def test_add_then_normed_is_the_layers_add_rms_norm(
    device: torch.device, dtype: torch.dtype, rows: int
) -> None:
    """The O projection's residual epilogue and the gate/up projection's RMSNorm (its weight
    folded into the projection's) give what ``o_proj``, ``add_rms_norm`` and ``gate_up_proj``
    give apart: the new residual stream exactly (one rounding, as PyTorch's add) and the next
    product within the matmul's error."""
    torch.manual_seed(rows)
    hidden, inner, out_features = 192, 128, 80  # N not a multiple of the tile: a ragged program
    x = torch.randn(rows, inner, dtype=dtype, device=device)
    w_o = torch.randn(hidden, inner, dtype=dtype, device=device) / inner**0.5
    residual = torch.randn(rows, hidden, dtype=dtype, device=device)
    norm = 1 + 0.1 * torch.randn(hidden, dtype=dtype, device=device)
    w_next = torch.randn(out_features, hidden, dtype=dtype, device=device) / hidden**0.5

    h, sums = skinny_matmul_add(x, w_o, residual, SMALL)
    expected_h = residual + skinny_matmul(x, w_o, config=SMALL)
    torch.testing.assert_close(h, expected_h, atol=0, rtol=0)
    torch.testing.assert_close(sums.sum(0)[:rows], h.float().pow(2).sum(-1), rtol=1e-5, atol=1e-4)
    assert torch.all(sums[:, rows:] == 0)  # the padded rows sum nothing

    out = skinny_matmul_normed(h, sums, 1e-5, w_next * norm, SMALL)
    normed, new_residual = add_rms_norm(skinny_matmul(x, w_o, config=SMALL), residual, norm, 1e-5)
    torch.testing.assert_close(new_residual, h, atol=0, rtol=0)
    torch.testing.assert_close(out, F.linear(normed, w_next), atol=3e-2, rtol=2e-2)


def test_normed_rejects_bad_statistics(device: torch.device) -> None:
    x = torch.randn(2, 64, dtype=torch.float16, device=device)
    w = torch.randn(8, 64, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="sums must be float32"):
        skinny_matmul_normed(x, torch.zeros(4, 8, device=device), 1e-5, w)
    with pytest.raises(ValueError, match="residual"):
        skinny_matmul_add(x, w, torch.zeros(2, 4, dtype=torch.float16, device=device))
