"""The skinny matmul (a decode step's linears at a few rows) against ``F.linear``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from berth.kernels.skinny_matmul import MAX_ROWS, SkinnyConfig, skinny_matmul

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
