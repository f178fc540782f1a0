"""The skinny linear against ``x @ weight.T`` in float32: rows padded to the tile, N and K off
the tile, every split, the same bits on every run, the arrival counters back at zero, and what
it refuses."""

from __future__ import annotations

import pytest
import torch

from berth.kernels import skinny_linear as sl

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float16, torch.bfloat16] if DEVICE.type == "cuda" else [torch.float16]


def check(m: int, n: int, k: int, config: sl.SkinnyConfig, dtype: torch.dtype) -> torch.Tensor:
    torch.manual_seed(m * 7 + n + k)
    x = torch.randn(m, k, dtype=dtype, device=DEVICE)
    w = torch.randn(n, k, dtype=dtype, device=DEVICE) / k**0.5
    y = sl.skinny_linear(x, w, config=config)
    ref = x.float() @ w.float().T
    assert y.shape == (m, n) and y.dtype == dtype
    # float32 accumulation, one rounding to the 16-bit output
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=2e-2)
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("m", "n", "k", "block_n", "block_k", "split"),
    [
        (1, 200, 256, 64, 64, None),  # one row; N off the tile; split picked for the SMs
        (5, 128, 320, 64, 64, 3),  # an uneven split: the last split shorter
        (16, 96, 104, 64, 64, 2),  # K off the tile (TMA reads zeros past it)
        (33, 136, 128, 64, 32, 1),  # rows padded to 64; no split
        (64, 64, 192, 64, 64, 4),  # more splits than steps per split: no empty split left
    ],
)
def test_matches_float32_product(
    m: int, n: int, k: int, block_n: int, block_k: int, split: int | None, dtype: torch.dtype
) -> None:
    check(m, n, k, sl.SkinnyConfig(block_n=block_n, block_k=block_k, split_k=split,
                                   num_stages=2), dtype)  # fmt: skip


def test_split_sums_are_the_same_bits_every_run_and_counters_return_to_zero() -> None:
    config = sl.SkinnyConfig(block_n=64, block_k=64, split_k=3, num_stages=2)
    first = check(8, 192, 384, config, torch.float16)
    for _ in range(3):
        again = check(8, 192, 384, config, torch.float16)
        assert torch.equal(first, again)
    assert int(sl.tile_counters(DEVICE, 1).abs().sum()) == 0


def test_writes_into_a_given_output_row_block() -> None:
    x = torch.randn(4, 128, dtype=torch.float16, device=DEVICE)
    w = torch.randn(64, 128, dtype=torch.float16, device=DEVICE)
    out = torch.full((4, 64), 7.0, dtype=torch.float16, device=DEVICE)
    got = sl.skinny_linear(x, w, out=out, config=sl.SkinnyConfig(block_n=64, block_k=64))
    assert got is out
    torch.testing.assert_close(out.float(), x.float() @ w.float().T, rtol=1e-2, atol=5e-2)


def test_split_for_gives_every_sm_a_program_within_the_k_steps() -> None:
    config = sl.SkinnyConfig(block_n=128, block_k=128)
    assert sl.split_for(4096, 4096, config, 132) == 8  # 32 tiles x 8 = 256 programs
    assert sl.split_for(28672, 4096, config, 132) == 1  # 224 tiles already
    assert sl.split_for(4096, 256, config, 132) == 2  # only two K steps to split
    assert sl.split_for(4096, 4096, sl.SkinnyConfig(split_k=3), 132) == 3


@pytest.mark.parametrize(
    ("x", "w"),
    [
        (torch.zeros(129, 64, dtype=torch.float16), torch.zeros(64, 64, dtype=torch.float16)),
        (torch.zeros(4, 64), torch.zeros(64, 64)),  # float32
        (torch.zeros(4, 64, dtype=torch.float16), torch.zeros(64, 64, dtype=torch.bfloat16)),
        (
            torch.zeros(4, 100, dtype=torch.float16)[:, :63],
            torch.zeros(64, 63, dtype=torch.float16),
        ),
        (torch.zeros(0, 64, dtype=torch.float16), torch.zeros(64, 64, dtype=torch.float16)),
        # an output row of 130 x 2 bytes: TMA stores 16-byte multiples
        (torch.zeros(4, 64, dtype=torch.float16), torch.zeros(130, 64, dtype=torch.float16)),
    ],
)
def test_refuses_what_tma_or_the_tile_cannot_take(x: torch.Tensor, w: torch.Tensor) -> None:
    assert not sl.supports(x, w)
    with pytest.raises(ValueError, match="skinny_linear takes"):
        sl.skinny_linear(x, w)


def test_refuses_an_output_it_cannot_store_into() -> None:
    x = torch.zeros(4, 64, dtype=torch.float16, device=DEVICE)
    w = torch.zeros(64, 64, dtype=torch.float16, device=DEVICE)
    wide = torch.zeros(4, 72, dtype=torch.float16, device=DEVICE)
    for out in (
        torch.zeros(4, 64, device=DEVICE),
        wide[:, 1:65],
        torch.zeros(5, 64, device=DEVICE),
    ):
        with pytest.raises(ValueError, match="out must be"):
            sl.skinny_linear(x, w, out=out)


def test_refuses_mismatched_inner_dimensions() -> None:
    x = torch.zeros(4, 64, dtype=torch.float16, device=DEVICE)
    w = torch.zeros(32, 128, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="x has 64 columns, weight 128"):
        sl.skinny_linear(x, w)
