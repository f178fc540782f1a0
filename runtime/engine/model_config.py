"""A model directory's config.json, checked and reduced to what the engine runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Hugging Face architecture -> Berth's family name. Mistral is Llama with another name.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


@dataclass(frozen=True)
class ModelConfig:
    """The decoder's hyper-parameters, whatever the checkpoint called them."""

    family: str  # "llama", "qwen2", "qwen3"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    dtype: torch.dtype  # the checkpoint's
    sliding_window: int | None

    @staticmethod
    def from_dir(model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: point the engine at a Hugging Face model directory "
                "(config.json, *.safetensors, tokenizer.json)"
            )
        return ModelConfig.from_dict(json.loads(path.read_text()))

    @staticmethod
    def from_dict(raw: dict[str, Any]) -> ModelConfig:
        architectures = raw.get("architectures") or []
        known = [a for a in architectures if a in SUPPORTED_ARCHITECTURES]
        if not known:
            raise ValueError(
                f"unsupported architecture {architectures or raw.get('model_type')!r}; Berth runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        family = SUPPORTED_ARCHITECTURES[known[0]]
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}; Berth runs SiLU-gated MLPs")
        # transformers 5 writes rope settings as "rope_parameters"; older files as two keys.
        rope = raw.get("rope_parameters") or {}
        rope_theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
        scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type") else None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind in ("default", None):
                scaling = None
            elif kind not in ("llama3", "linear"):
                raise ValueError(
                    f"unsupported rope scaling {kind!r}; Berth supports llama3, linear"
                )
        num_heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        head_dim = raw.get("head_dim") or hidden // num_heads
        torch_dtype = str(raw.get("torch_dtype") or raw.get("dtype") or "float32")
        if torch_dtype not in DTYPES:
            raise ValueError(f"unsupported checkpoint dtype {torch_dtype!r}")
        window = raw.get("sliding_window")
        if family != "llama" and not raw.get("use_sliding_window", False):
            window = None
        return ModelConfig(
            family=family,
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            vocab_size=int(raw["vocab_size"]),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or bool(raw.get("attention_bias", False)),
            qk_norm=family == "qwen3",
            dtype=DTYPES[torch_dtype],
            sliding_window=int(window) if window else None,
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token over all layers, in the checkpoint's dtype."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def hf_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape as a Hugging Face checkpoint of this model stores it."""
        h, d = self.hidden_size, self.head_dim
        q, kv, inter = self.num_heads * d, self.num_kv_heads * d, self.intermediate_size
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = (h,)
            out[p + "self_attn.q_proj.weight"] = (q, h)
            out[p + "self_attn.k_proj.weight"] = (kv, h)
            out[p + "self_attn.v_proj.weight"] = (kv, h)
            if self.qkv_bias:
                out[p + "self_attn.q_proj.bias"] = (q,)
                out[p + "self_attn.k_proj.bias"] = (kv,)
                out[p + "self_attn.v_proj.bias"] = (kv,)
            if self.qk_norm:
                out[p + "self_attn.q_norm.weight"] = (d,)
                out[p + "self_attn.k_norm.weight"] = (d,)
            out[p + "self_attn.o_proj.weight"] = (h, q)
            out[p + "post_attention_layernorm.weight"] = (h,)
            out[p + "mlp.gate_proj.weight"] = (inter, h)
            out[p + "mlp.up_proj.weight"] = (inter, h)
            out[p + "mlp.down_proj.weight"] = (h, inter)
        out["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            out["lm_head.weight"] = (self.vocab_size, h)
        return out
