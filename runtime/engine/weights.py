"""Loading a Hugging Face safetensors checkpoint into ``CausalLM``, checking every tensor.

Each checkpoint tensor is read once, straight to the target device, cast to the engine's dtype
and copied into its (possibly fused) parameter; nothing holds a second copy of the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from berth.runtime.engine.model import CausalLM
from berth.runtime.engine.model_config import ModelConfig

# Tensors some checkpoints carry that the engine recomputes or does not need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory (sharded via the index, or not)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(
                f"{model_dir}: shards named in the index are missing: {missing}"
            )
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{model_dir} holds no *.safetensors weights (Berth loads safetensors only)"
        )
    return files


def load_weights(model: CausalLM, config: ModelConfig, model_dir: Path) -> None:
    """Fill every parameter of ``model`` from the checkpoint; raise on anything missing,
    unexpected or of the wrong shape."""
    from safetensors import safe_open

    expected = config.hf_weight_shapes()
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    seen: set[str] = set()
    for file in checkpoint_files(model_dir):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # tied: the embedding serves as the head
                if name not in expected:
                    raise ValueError(
                        f"{file.name}: unexpected tensor {name!r} for a {config.family} model "
                        f"with {config.num_layers} layers"
                    )
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != expected[name]:
                    raise ValueError(
                        f"{file.name}: {name} has shape {tuple(tensor.shape)}, config.json "
                        f"implies {expected[name]}"
                    )
                _assign(model, params, name, tensor)
                seen.add(name)
    missing = [n for n in expected if n not in seen]
    if missing:
        raise ValueError(
            f"{model_dir}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:4]}"
        )


def _assign(
    model: CausalLM, params: dict[str, torch.nn.Parameter], name: str, t: torch.Tensor
) -> None:
    """Copy a checkpoint tensor into its parameter, or into its rows of a fused one."""
    module, _, kind = name.rpartition(".")  # kind: weight / bias
    parent, _, proj = module.rpartition(".")
    with torch.no_grad():
        if proj in CausalLM.PACKED:
            fused, index = CausalLM.PACKED[proj]
            start, end = model.part_rows(fused, index)
            params[f"{parent}.{fused}.{kind}"][start:end].copy_(t)
        else:
            params[name].copy_(t)
