"""The decoder's projections: the skinny kernel only where the runner turned it on, only for few
rows and no bias, and the switch back off after a capture (the GPU side: test_engine_gpu.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from berth.kernels import skinny_matmul as kernel
from berth.kernels.skinny_matmul import SkinnyConfig
from berth.runtime.engine import Engine, EngineConfig, SamplingParams
from berth.runtime.engine.decode_linear import MAX_ROWS, DecodeLinear, by_kind, skinny


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows of each skinny kernel call."""
    seen: list[int] = []
    real = kernel.skinny_matmul

    def recording(x: torch.Tensor, w: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        seen.append(x.shape[0])
        return real(x, w, *args, **kw)

    monkeypatch.setattr(kernel, "skinny_matmul", recording)
    return seen


# The interpreter on the CPU (CI), the compiled kernel where a GPU is.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_limit_matches_the_kernel() -> None:
    assert MAX_ROWS == kernel.MAX_ROWS


def test_skinny_projection_matches_linear_up_to_the_row_limit(calls: list[int]) -> None:
    torch.manual_seed(0)
    proj = DecodeLinear("o", 128, 96, bias=False).half().to(DEVICE)
    proj.skinny = SkinnyConfig(block_n=16, block_k=64)
    for rows in (1, MAX_ROWS, MAX_ROWS + 1):
        x = torch.randn(rows, 128, dtype=torch.float16, device=DEVICE)
        torch.testing.assert_close(proj(x), F.linear(x, proj.weight), atol=2e-2, rtol=1e-2)
    assert calls == [1, MAX_ROWS]  # 17 rows went to nn.Linear


def test_off_by_default_and_never_with_a_bias(calls: list[int]) -> None:
    x = torch.randn(2, 64, dtype=torch.float16, device=DEVICE)
    plain = DecodeLinear("qkv", 64, 64, bias=False).half().to(DEVICE)
    biased = DecodeLinear("qkv", 64, 64, bias=True).half().to(DEVICE)
    biased.skinny = SkinnyConfig()
    plain(x), biased(x)
    assert calls == []


def test_capture_switch_turns_on_the_chosen_kinds_and_everything_off_after() -> None:
    model = torch.nn.Sequential(
        DecodeLinear("qkv", 64, 64, bias=False),
        DecodeLinear("o", 64, 64, bias=False),
        DecodeLinear("qkv", 64, 64, bias=False),
        DecodeLinear("qkv", 64, 64, bias=True),  # Qwen2's: never skinny, not grouped
    )
    kinds = by_kind(model)
    assert {k: len(v) for k, v in kinds.items()} == {"qkv": 2, "o": 1}
    config = SkinnyConfig(block_k=128)
    with skinny(kinds, {"o": config}):
        assert [m.skinny for m in model] == [None, config, None, None]
    assert all(m.skinny is None for m in model)
    with pytest.raises(RuntimeError), skinny(kinds, {"qkv": config, "o": config}):
        raise RuntimeError("a capture that fails")
    assert all(m.skinny is None for m in model)


def test_every_layer_offers_its_four_projections(tiny_model: Path) -> None:
    engine = Engine(EngineConfig(model=str(tiny_model), device="cpu"))
    kinds = by_kind(engine.runner.model)
    layers = engine.model_config.num_layers
    assert {k: len(v) for k, v in kinds.items()} == dict.fromkeys(
        ("qkv", "o", "gate_up", "down"), layers
    )


def test_fused_norms_give_the_unfused_tokens(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every projection on the kernel, with and without the RMSNorms fused into it (the O and
    down projections' epilogue adds to the residual stream, the gate/up and next QKV
    projections scale their product by each row's 1/rms, the norms' weights folded into
    theirs): the same greedy tokens, and the fused run calls the
    fused kernels, per decode step of a layer one of each kind per norm (the first layer's
    input norm and the final norm stay apart)."""
    engine = Engine(EngineConfig(model=str(tiny_model), device=DEVICE.type, dtype="float16",
                                 enforce_eager=True, kv_cache_bytes=64 << 20))  # fmt: skip
    engine.runner.model.fold_norms()  # as the runner does where it fuses norms
    layers = engine.model_config.num_layers
    kinds = by_kind(engine.runner.model)
    configs = dict.fromkeys(kinds, SkinnyConfig(block_n=16, block_k=64))
    fused: list[str] = []
    for name in ("skinny_matmul_add", "skinny_matmul_normed"):
        real = getattr(kernel, name)

        def recording(*args: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
            fused.append(_name)
            return _real(*args, **kw)

        monkeypatch.setattr(kernel, name, recording)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    with skinny(kinds, configs):
        apart = [out.new_token_ids for out in engine.generate(prompts, params)]
    assert fused == []
    with skinny(kinds, configs, fuse_norms=True):
        together = [out.new_token_ids for out in engine.generate(prompts, params)]
    assert together == apart
    per_step = fused[: 2 * (2 * layers - 1)]
    assert per_step.count("skinny_matmul_add") == per_step.count("skinny_matmul_normed")
    assert per_step.count("skinny_matmul_add") == 2 * layers - 1
    assert all(not m.fuse_norms and m.skinny is None for ms in kinds.values() for m in ms)
