"""The FP8 (e4m3) KV cache: the write kernel quantizes as the reference does, and the decode and
prefill kernels read it as the reference dequantizes it; the quantization error itself stays
small against the unquantized cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from paged_checks import CPU_DTYPES, GPU_DTYPES, assert_close, poison_chunk_slots, poisoned_like

from berth.kernels import checks, reference, write_kv_cache
from berth.kernels.decode import DecodeConfig, launch_decode
from berth.kernels.prefill import PrefillConfig, launch_prefill
from berth.kernels.synthetic import PagedBatch, random_paged_batch

FP8 = torch.float8_e4m3fn


def quantized(batch: PagedBatch) -> tuple[torch.Tensor, ...]:
    """(k fp8, v fp8, k_scale, v_scale) of the batch's cache, by the reference's rule."""
    k, ks = reference.quantize_fp8(batch.k_cache)
    v, vs = reference.quantize_fp8(batch.v_cache)
    return k, v, ks, vs


def run_fp8_decode(
    batch: PagedBatch, query: torch.Tensor, max_len: int, config: DecodeConfig | None
) -> torch.Tensor:
    """The kernel over the batch's cache quantized, checked against the reference's
    dequantization of the same cache; returns the kernel's output."""
    k, v, ks, vs = quantized(batch)
    scale = query.shape[-1] ** -0.5
    out = poisoned_like(query)
    launch_decode(query, k, v, batch.block_tables, batch.seq_lens, scale, out, max_len, config,
                  ks, vs)  # fmt: skip
    expected = reference.paged_decode_attention(
        query.double(), k, v, batch.block_tables, batch.seq_lens, scale, k_scale=ks, v_scale=vs
    )
    assert_close(out, expected, query.dtype)
    return out


def test_write_kernel_quantizes_like_the_reference(device: torch.device) -> None:
    torch.manual_seed(0)
    tokens, blocks, bs, heads, dim = 9, 4, 4, 3, 32
    key = torch.randn(tokens, heads, dim, device=device) * torch.logspace(-3, 2, tokens)[
        :, None, None
    ].to(device)  # magnitudes from 1e-3 to 100: the scale follows each token
    value = torch.randn(tokens, heads, dim, device=device)
    key[2] = 0.0  # an all-zero token keeps a finite scale
    slots = torch.tensor([0, 5, 2, -1, 15, 7, 8, 1, 11], dtype=torch.int64, device=device)
    caches = {}
    for name, write in (("kernel", write_kv_cache), ("reference", reference.write_kv_cache)):
        k = torch.zeros(blocks, bs, heads, dim, dtype=FP8, device=device)
        v = torch.zeros_like(k)
        ks = torch.zeros(blocks, bs, heads, device=device)
        vs = torch.zeros_like(ks)
        write(key, value, k, v, slots, ks, vs)
        caches[name] = (k.float() * ks[..., None], v.float() * vs[..., None], ks, vs)
    for got, want in zip(caches["kernel"], caches["reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)
    k_deq = caches["kernel"][0].view(-1, heads, dim)
    kept = slots >= 0
    original = key[kept]
    restored = k_deq[slots[kept]]
    # e4m3 keeps 3 mantissa bits: each element within 1/16 of its row's largest magnitude
    bound = original.abs().amax(-1, keepdim=True) / 16 + 1e-12
    assert ((restored - original).abs() <= bound).all()
    assert torch.isfinite(caches["kernel"][2]).all()


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize(
    "config",
    [
        DecodeConfig(block_n=16, split_waves=4, min_split_tokens=16),
        DecodeConfig(block_n=16),
        DecodeConfig(block_n=16, no_split_waves=0.0),
    ],
    ids=["split", "default-split", "single"],
)
@pytest.mark.parametrize("words", [True, False], ids=["words", "bytes"])
@pytest.mark.parametrize("head_dim", [32, 16])  # 16: too shallow for words, read as bytes
def test_fp8_decode_matches_the_dequantized_reference(
    device: torch.device,
    dtype: torch.dtype,
    group: int,
    config: DecodeConfig,
    words: bool,
    head_dim: int,
) -> None:
    seq_lens = [1, 37, 70]
    batch = random_paged_batch(seq_lens, 2, head_dim, 16, torch.float32, device)
    query = torch.randn(len(seq_lens), 2 * group, head_dim, dtype=dtype, device=device)
    out = run_fp8_decode(batch, query, 70, dataclasses.replace(config, fp8_words=words))
    exact = reference.paged_decode_attention(
        query.double(), batch.k_cache.double(), batch.v_cache.double(), batch.block_tables,
        batch.seq_lens, head_dim**-0.5,
    )  # fmt: skip
    err = float((out.double() - exact).norm() / exact.norm())
    assert err < 0.05, f"FP8 cache off the unquantized one by {err:.3f}"


@pytest.mark.parametrize("num_seqs", [8, 1], ids=["unsplit", "split"])
def test_fp8_decode_default_config_on_unsplit_and_split_grids(
    device: torch.device, num_seqs: int
) -> None:
    """The default launch (no config), as the engine calls it: an unsplit grid runs the words
    kernel with half the default tile, a split one with the default tile; both match."""
    torch.manual_seed(2)
    seq_lens = [1 + 23 * i for i in range(num_seqs)] if num_seqs > 1 else [150]
    batch = random_paged_batch(seq_lens, 2, 32, 16, torch.float32, device)
    query = torch.randn(num_seqs, 4, 32, dtype=torch.float16, device=device)
    run_fp8_decode(batch, query, max(seq_lens), None)


def test_fp8_decode_words_and_bytes_agree_and_odd_strides_read_bytes(
    device: torch.device,
) -> None:
    """The two readings of one cache give the same output up to fp16 rounding, and a cache
    whose rows sit at odd byte strides (no 16-bit view exists) is still read, as bytes."""
    torch.manual_seed(1)
    seq_lens = [5, 64, 33]
    batch = random_paged_batch(seq_lens, 2, 32, 16, torch.float32, device)
    query = torch.randn(len(seq_lens), 8, 32, dtype=torch.float16, device=device)
    k, v, ks, vs = quantized(batch)
    args = (batch.block_tables, batch.seq_lens, 32**-0.5, None, 64)
    config = DecodeConfig(block_n=16)
    as_words = launch_decode(query, k, v, *args, config, ks, vs)
    as_bytes = launch_decode(
        query, k, v, *args, dataclasses.replace(config, fp8_words=False), ks, vs
    )
    torch.testing.assert_close(as_words, as_bytes, rtol=2e-3, atol=2e-3)
    k_odd = torch.zeros(*k.shape[:3], 33, dtype=FP8, device=device)[..., :32]  # rows 33 apart
    v_odd = torch.zeros(*k.shape[:3], 33, dtype=FP8, device=device)[..., :32]
    k_odd.copy_(k)
    v_odd.copy_(v)
    assert k_odd.stride(2) % 2 == 1
    odd = launch_decode(query, k_odd, v_odd, *args, config, ks, vs)
    torch.testing.assert_close(odd, as_bytes, rtol=0, atol=0)


@pytest.mark.parametrize("self_kv", [False, True], ids=["cache", "key_value"])
@pytest.mark.parametrize(
    "config",
    [
        PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=2),
        PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=2, paged_block_n=32),
    ],
    ids=["16x16", "16x16/32"],
)
def test_fp8_prefill_matches_the_dequantized_reference(
    device: torch.device, self_kv: bool, config: PrefillConfig
) -> None:
    """A fresh prompt, chunks after prefixes that end mid step and on a step edge, and decode
    tokens; the chunks' own K/V from the (quantized) cache or unquantized from key/value."""
    seq_lens, query_lens = [21, 45, 80, 9, 1], [21, 13, 16, 1, 1]
    dtype = torch.float16
    batch = random_paged_batch(seq_lens, 2, 32, 16, dtype, device)
    starts = torch.tensor([0, *query_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    query_start_loc = starts.to(device)
    query = torch.randn(sum(query_lens), 4, 32, dtype=dtype, device=device)
    key = value = None
    if self_kv:
        key, value = batch.chunk_kv(query_lens)
        poison_chunk_slots(batch, query_lens)
    k, v, ks, vs = quantized(batch)
    out = poisoned_like(query)
    launch_prefill(query, k, v, batch.block_tables, batch.seq_lens, query_start_loc, 32**-0.5,
                   out, config, key, value, ks, vs)  # fmt: skip
    expected = reference.paged_prefill_attention(
        query.double(), k, v, batch.block_tables, batch.seq_lens, query_start_loc, 32**-0.5,
        key=None if key is None else key.double(),
        value=None if value is None else value.double(),
        k_scale=ks, v_scale=vs,
    )  # fmt: skip
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("capability", [(7, 5), (8, 0), (8, 6)])
def test_fp8_cache_is_refused_below_compute_capability_8_9(capability: tuple[int, int]) -> None:
    with pytest.raises(
        ValueError, match=rf"capability 8.9 or later.*is {capability[0]}\.{capability[1]}"
    ):
        checks.check_fp8_capability(capability)


@pytest.mark.parametrize("capability", [(8, 9), (9, 0), (10, 0)])
def test_fp8_cache_is_accepted_from_compute_capability_8_9(capability: tuple[int, int]) -> None:
    checks.check_fp8_capability(capability)


def test_fp8_cache_and_scales_go_together(device: torch.device) -> None:
    batch = random_paged_batch([5], 2, 32, 16, torch.float16, device)
    k, v, ks, vs = quantized(batch)
    query = torch.randn(1, 2, 32, dtype=torch.float16, device=device)
    args = (batch.block_tables, batch.seq_lens, 32**-0.5, None, 5, None)
    with pytest.raises(ValueError, match="needs k_scale and v_scale"):
        launch_decode(query, k, v, *args)
    with pytest.raises(ValueError, match="go with an FP8 cache"):
        launch_decode(query, batch.k_cache, batch.v_cache, *args, ks, vs)
    with pytest.raises(ValueError, match="k_scale must be"):
        launch_decode(query, k, v, *args, ks[:, :1], vs)
    with pytest.raises(TypeError, match="k_scale"):
        launch_decode(query, k, v, *args, ks.double(), vs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_fp8_decode_full_shape_on_gpu(device: torch.device, dtype: torch.dtype) -> None:
    """Llama-3-8B attention (32/8 heads, D 128) over 16-token pages, long and short sequences."""
    seq_lens = [4096, 1, 777, 2048]
    batch = random_paged_batch(seq_lens, 8, 128, 16, dtype, device)
    query = torch.randn(len(seq_lens), 32, 128, dtype=dtype, device=device)
    run_fp8_decode(batch, query, 4096, None)
