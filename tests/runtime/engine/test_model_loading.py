"""Loading models: clear errors for what Berth cannot run, and test models made here."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from berth.cli import main
from berth.runtime.engine import Engine, EngineConfig
from berth.runtime.engine.testmodels import make_model


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _engine(model: Path) -> Engine:
    return Engine(EngineConfig(model=str(model), device="cpu"))


def test_unsupported_architecture_is_named(tiny_model: Path, tmp_path: Path) -> None:
    model = _copy(tiny_model, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unsupported architecture.*GPT2LMHeadModel"):
        _engine(model)


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("config.json", r"config\.json is missing"),
        ("tokenizer.json", r"tokenizer\.json is missing"),
        ("model.safetensors", r"holds no \*\.safetensors weights"),
    ],
)
def test_missing_file_is_named(
    missing: str, message: str, tiny_model: Path, tmp_path: Path
) -> None:
    model = _copy(tiny_model, tmp_path / "m")
    (model / missing).unlink()
    with pytest.raises(FileNotFoundError, match=message):
        _engine(model)


def test_shape_mismatch_names_the_tensor(tiny_model: Path, tmp_path: Path) -> None:
    model = _copy(tiny_model, tmp_path / "m")
    tensors = load_file(model / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 1)
    save_file(tensors, model / "model.safetensors")
    with pytest.raises(ValueError, match=r"down_proj\.weight has shape"):
        _engine(model)


def test_missing_tensor_is_reported(tiny_model: Path, tmp_path: Path) -> None:
    model = _copy(tiny_model, tmp_path / "m")
    tensors = load_file(model / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, model / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks 1 tensors.*model\.norm\.weight"):
        _engine(model)


def test_make_model_is_reproducible_and_shards_with_an_index(tmp_path: Path) -> None:
    a = make_model("tiny", tmp_path / "a", seed=3, dtype="bfloat16", max_shard_bytes=40_000)
    b = make_model("tiny", tmp_path / "b", seed=3, dtype="bfloat16", max_shard_bytes=40_000)
    c = make_model("tiny", tmp_path / "c", seed=4, dtype="bfloat16", max_shard_bytes=40_000)
    shards = sorted(p.name for p in a.glob("*.safetensors"))
    assert len(shards) > 1 and (a / "model.safetensors.index.json").exists()
    for name in [*shards, "tokenizer.json", "config.json"]:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / shards[0]).read_bytes() != (c / shards[0]).read_bytes()
    engine = Engine(EngineConfig(model=str(a), device="cpu"))
    assert engine.runner.dtype == torch.bfloat16


def test_make_model_rejects_an_unknown_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model shape 'gpt-5'"):
        make_model("gpt-5", tmp_path)


def test_real_shapes_match_their_published_parameter_counts() -> None:
    from berth.runtime.engine.model_config import ModelConfig
    from berth.runtime.engine.testmodels import SHAPES, _config_json

    def params(name: str) -> float:
        shape = SHAPES[name]
        raw = _config_json(shape, shape.vocab_size or 0, "bfloat16", 0, [1])
        sizes = ModelConfig.from_dict(raw).hf_weight_shapes().values()
        return sum(torch.Size(s).numel() for s in sizes) / 1e9

    assert round(params("llama-3-8b"), 2) == 8.03
    assert round(params("llama-3.2-1b"), 2) == 1.24
    assert round(params("qwen3-4b"), 2) == 4.02


def test_cli_makes_a_model_and_generates_from_it(tmp_path: Path) -> None:
    runner = CliRunner()
    made = runner.invoke(
        main, ["make-model", "tiny", "--out", str(tmp_path / "m"), "--dtype", "float32"]
    )
    assert made.exit_code == 0, made.output
    out = runner.invoke(
        main,
        [
            "generate",
            "--model",
            str(tmp_path / "m"),
            "--max-tokens",
            "4",
            "--device",
            "cpu",
            "Hello",
            "Bye",
        ],
    )
    assert out.exit_code == 0, out.output
    assert out.output.count("(4 tokens, length)") == 2
    bad = runner.invoke(main, ["make-model", "nope", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "unknown model shape" in bad.output


def test_fixture_factory_models_load(model_factory: Callable[[str], Path]) -> None:
    engine = _engine(model_factory("tiny-qwen3"))
    assert engine.model_config.qk_norm and engine.model_config.tie_word_embeddings


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_engines_run_and_start_like_fp32(dtype: str, tiny_model: Path) -> None:
    from berth.runtime.engine import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    prompts: list[str | list[int]] = ["Hello there", "The quick brown fox"]
    half = Engine(EngineConfig(model=str(tiny_model), device="cpu", dtype=dtype))
    full = Engine(EngineConfig(model=str(tiny_model), device="cpu", dtype="float32"))
    assert half.runner.dtype == getattr(torch, dtype)
    got = [o.new_token_ids for o in half.generate(prompts, params)]
    assert got == [o.new_token_ids for o in full.generate(prompts, params)]
