"""RoPE fused with the KV cache write: the kernel against its reference (in place on views of a
fused projection, padding rotated but not stored, Qwen3's q/k norm, an FP8 cache), and the
reference against the model's unfused path."""

from __future__ import annotations

import pytest
import torch
from paged_checks import CPU_DTYPES, GPU_DTYPES

from berth.kernels import reference, rope_write_kv_cache
from berth.runtime.engine import layers

FP8 = torch.float8_e4m3fn


def fused_projection(
    tokens: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """q, k, v [T, H, D] as the engine has them: views into one QKV output row per token."""
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, dtype=dtype, device=device)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    return qkv, q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(-1, kv_heads, dim)


def rope_table(tokens: int, dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[T, 2, D] cos/sin rows of scattered positions (the model's table, gathered)."""
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    pos = torch.randint(0, 4096, (tokens,)).float()
    emb = torch.cat((torch.outer(pos, inv),) * 2, dim=-1)
    return torch.stack((emb.cos(), emb.sin()), dim=1).to(dtype).to(device)


def run_both(
    heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: torch.device,
    *, norm: bool = False, cache_dtype: torch.dtype | None = None,
) -> tuple[dict[str, tuple[torch.Tensor, ...]], torch.Tensor, torch.Tensor]:  # fmt: skip
    """The kernel and the reference on the same inputs: each's (qkv, k_cache, v_cache, scales),
    the QKV projection before, and the slots."""
    torch.manual_seed(0)
    tokens, blocks, bs = 11, 4, 8
    qkv, _, _, _ = fused_projection(tokens, heads, kv_heads, dim, dtype, device)
    table = rope_table(tokens, dim, dtype, device)
    slots = torch.randperm(blocks * bs)[:tokens].to(device)
    slots[::4] = -1  # padding tokens
    weights = (torch.rand(2, dim, dtype=dtype, device=device) + 0.5) if norm else None
    results = {}
    for name, fn in (("kernel", rope_write_kv_cache), ("reference", reference.rope_write_kv_cache)):
        buf = qkv.clone()
        q, k, v = buf.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        shape = (blocks, bs, kv_heads, dim)
        k_cache = torch.zeros(shape, dtype=cache_dtype or dtype, device=device)
        v_cache = torch.zeros_like(k_cache)
        scales = {}
        if cache_dtype == FP8:
            scales = {
                "k_scale": torch.zeros(shape[:3], device=device),
                "v_scale": torch.zeros(shape[:3], device=device),
            }
        norms = {} if weights is None else {"q_norm": weights[0], "k_norm": weights[1], "eps": 1e-6}
        fn(
            q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim),
            v.view(tokens, kv_heads, dim), table[:, 0], table[:, 1], k_cache, v_cache, slots,
            **scales, **norms,
        )  # fmt: skip
        results[name] = (buf, k_cache, v_cache, *scales.values())
    return results, qkv, slots


def assert_ulp_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to one rounding of the dtype (the kernel's FMAs and rsqrt may round differently)."""
    eps = torch.finfo(want.dtype).eps if want.dtype.is_floating_point else 0
    if want.dtype == FP8:
        got, want = got.float(), want.float()
        eps = 2**-3
    torch.testing.assert_close(got.float(), want.float(), rtol=2 * eps, atol=2 * eps)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(4, 2, 32), (6, 3, 48)])
@pytest.mark.parametrize("norm", [False, True], ids=["llama", "qwen3-norm"])
def test_kernel_matches_reference_in_place(
    device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, dim: int, norm: bool
) -> None:
    results, before, _ = run_both(heads, kv_heads, dim, dtype, device, norm=norm)
    kernel, ref = results["kernel"], results["reference"]
    for got, want in zip(kernel, ref, strict=True):
        assert_ulp_close(got, want)
    q_end = heads * dim
    kv_end = q_end + kv_heads * dim
    buf = kernel[0]
    assert not torch.equal(buf[:, :kv_end], before[:, :kv_end])  # q and k rotated in place
    assert torch.equal(buf[:, kv_end:], before[:, kv_end:])  # v untouched


def test_padding_is_rotated_but_not_stored(device: torch.device) -> None:
    results, before, slots = run_both(4, 2, 32, torch.float32, device)
    buf, k_cache, v_cache = results["kernel"]
    padding = slots < 0
    assert padding.sum() == 3
    assert not torch.equal(buf[padding, :192], before[padding, :192])  # rotated all the same
    want = sorted(s for s in slots.tolist() if s >= 0)
    for cache in (k_cache, v_cache):
        written = cache.flatten(0, 1).ne(0).any(-1).any(-1).nonzero().flatten()
        assert written.tolist() == want


def test_fp8_cache_quantizes_like_the_reference(device: torch.device) -> None:
    results, _, _ = run_both(4, 2, 32, torch.float32, device, cache_dtype=FP8)
    kernel, ref = results["kernel"], results["reference"]
    assert_ulp_close(kernel[0], ref[0])
    for got, want, scale_got, scale_want in (
        (kernel[1], ref[1], kernel[3], ref[3]),
        (kernel[2], ref[2], kernel[4], ref[4]),
    ):
        torch.testing.assert_close(scale_got, scale_want, rtol=1e-6, atol=0.0)
        dequantized = (got.float() * scale_got[..., None], want.float() * scale_want[..., None])
        torch.testing.assert_close(*dequantized, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("norm", [False, True], ids=["llama", "qwen3-norm"])
def test_reference_agrees_with_the_models_unfused_path(norm: bool) -> None:
    """In float64 rounding vanishes: the fused reference is the model's RoPE (after Qwen3's
    norm) followed by the plain cache write."""
    torch.manual_seed(1)
    tokens, heads, kv_heads, dim, dtype = 7, 4, 2, 16, torch.float64
    _, q, k, v = fused_projection(tokens, heads, kv_heads, dim, dtype, torch.device("cpu"))
    table = rope_table(tokens, dim, dtype, torch.device("cpu"))
    cos, sin = table[:, 0], table[:, 1]
    slots = torch.arange(tokens) * 2
    w = torch.rand(2, dim, dtype=dtype) + 0.5
    if norm:
        q_want, k_want = layers.qk_norm_rope(q, k, w[0], w[1], 1e-6, cos, sin)
    else:
        q_want, k_want = layers.rope(q, k, cos, sin)
    k_cache_want = torch.zeros(2 * tokens, 1, kv_heads, dim, dtype=dtype)
    v_cache_want = torch.zeros_like(k_cache_want)
    reference.write_kv_cache(k_want, v, k_cache_want, v_cache_want, slots)
    k_cache = torch.zeros_like(k_cache_want)
    v_cache = torch.zeros_like(k_cache_want)
    norms = {"q_norm": w[0], "k_norm": w[1], "eps": 1e-6} if norm else {}
    reference.rope_write_kv_cache(q, k, v, cos, sin, k_cache, v_cache, slots, **norms)
    for got, want in ((q, q_want), (k, k_want), (k_cache, k_cache_want), (v_cache, v_cache_want)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_bad_inputs_are_refused_by_name(device: torch.device) -> None:
    _, q, k, v = fused_projection(3, 4, 2, 32, torch.float32, device)
    table = rope_table(3, 32, torch.float32, device)
    cache = torch.zeros(2, 8, 2, 32, device=device)
    slots = torch.arange(3, device=device)
    cos, sin = table[:, 0], table[:, 1]
    with pytest.raises(TypeError, match="slot_mapping"):
        rope_write_kv_cache(q, k, v, cos, sin, cache, cache.clone(), slots.int())
    with pytest.raises(ValueError, match="cos must be"):
        rope_write_kv_cache(q, k, v, cos[:, :16], sin, cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="query must be"):
        rope_write_kv_cache(q[:2], k, v, cos, sin, cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="q_norm and k_norm"):
        rope_write_kv_cache(q, k, v, cos, sin, cache, cache.clone(), slots, q_norm=cos[0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("norm", [False, True], ids=["llama", "qwen3-norm"])
def test_full_shapes_on_gpu(device: torch.device, dtype: torch.dtype, norm: bool) -> None:
    results, _, _ = run_both(32, 8, 128, dtype, device, norm=norm)
    for got, want in zip(results["kernel"], results["reference"], strict=True):
        assert_ulp_close(got, want)
