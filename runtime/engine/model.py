"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2 with QKV bias, Qwen3 with q/k norm).

Tokens of all sequences in a step are packed into one ``[T, hidden]`` batch. Attention reads
and writes the paged KV cache through three kernel functions (Triton on the GPU, their PyTorch
references on the CPU) chosen once by the runner. Projections are fused (QKV, gate+up) so a
layer is a handful of launches; numerics otherwise follow Hugging Face's implementation (norms
in fp32, RoPE tables in fp32 cast to the model dtype).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from berth.runtime.engine.decode_linear import DecodeLinear, fuses_norm
from berth.runtime.engine.layers import Pointwise
from berth.runtime.engine.model_config import ModelConfig


@dataclass
class AttentionOps:
    """The paged-attention kernels in use: ``berth.kernels`` or ``berth.kernels.reference``.

    ``rope_write_kv_cache`` (RoPE, Qwen3's q/k norm and the cache write in one kernel) replaces
    ``Pointwise``'s RoPE and ``write_kv_cache`` where it is set: on the GPU. The CPU keeps them
    apart, in Hugging Face's arithmetic, which the equality tests rely on.
    """

    write_kv_cache: Callable[..., Any]
    paged_decode_attention: Callable[..., Any]
    paged_prefill_attention: Callable[..., Any]
    rope_write_kv_cache: Callable[..., Any] | None = None


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the cache and what each may attend to."""

    slot_mapping: torch.Tensor  # int64 [T]; -1 = padding
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    seq_lens: torch.Tensor  # int32 [B], tokens in the cache including the new ones
    query_start_loc: torch.Tensor | None  # int32 [B+1]; None = decode (one token per sequence)
    max_seq_len: int  # upper bound of seq_lens (decode kernel split count)


class Stream(NamedTuple):
    """What passes from one decoder layer to the next: its output ``x``, not yet added to the
    ``residual`` stream (None before the first layer), or, where the skinny kernel added it
    already (``DecodeLinear.add``), x None and ``sums``, the stream's squared row sums in parts:
    the next RMSNorm's statistics, by which the next QKV projection scales its product."""

    x: torch.Tensor | None
    residual: torch.Tensor | None
    sums: torch.Tensor | None = None


class RMSNorm(nn.Module):
    """The norm's weight; the arithmetic is ``Pointwise.rms_norm`` / ``add_rms_norm``."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim / 2], with Llama 3's long-context rescaling."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = config.rope_scaling
    if scaling is None:
        return inv
    factor = float(scaling["factor"])
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        return inv / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, ops: AttentionOps, pointwise: Pointwise) -> None:
        super().__init__()
        self.pointwise = pointwise
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = DecodeLinear(
            "qkv", config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias
        )
        self.o_proj = DecodeLinear("o", self.q_size, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.scale = self.head_dim**-0.5
        self.ops = ops
        self.k_cache = torch.empty(0)  # [num_blocks, block_size, Hkv, D], set by the runner
        self.v_cache = torch.empty(0)
        # An FP8 cache's scales [num_blocks, block_size, Hkv], else None; set by the runner.
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None

    def forward(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Attention of the QKV projection's output ``qkv`` [T, (Hq + 2 Hkv) D]: [T, Hq D], the
        O projection's input (the layer runs both projections, so it can fuse their norms)."""
        t = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        scales = {"k_scale": self.k_scale, "v_scale": self.v_scale}
        fused = self.ops.rope_write_kv_cache
        if fused is not None:  # q and k rotated in place, in the projection's output
            norms: dict[str, Any] = {}
            if self.q_norm is not None and self.k_norm is not None:
                norms = {"q_norm": self.q_norm.weight, "k_norm": self.k_norm.weight}
                norms["eps"] = self.q_norm.eps
            fused(q, k, v, cos, sin, self.k_cache, self.v_cache, meta.slot_mapping,
                  **scales, **norms)  # fmt: skip
        else:
            if self.q_norm is not None and self.k_norm is not None:
                q, k = self.pointwise.qk_norm_rope(
                    q, k, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, cos, sin
                )
            else:
                q, k = self.pointwise.rope(q, k, cos, sin)
            self.ops.write_kv_cache(k, v, self.k_cache, self.v_cache, meta.slot_mapping, **scales)
        if meta.query_start_loc is None:
            o = self.ops.paged_decode_attention(
                q,
                self.k_cache,
                self.v_cache,
                meta.block_tables,
                meta.seq_lens,
                self.scale,
                max_seq_len=meta.max_seq_len,
                **scales,
            )
        else:
            # The chunk's own K/V also go in directly: the kernel reads them without the
            # page table (the prefix still comes from the cache written above).
            o = self.ops.paged_prefill_attention(
                q,
                self.k_cache,
                self.v_cache,
                meta.block_tables,
                meta.seq_lens,
                meta.query_start_loc,
                self.scale,
                key=k,
                value=v,
                **scales,
            )
        return o.reshape(t, self.q_size)


class MLP(nn.Module):
    """The feed-forward block's two projections (the layer runs them, around SiLU-and-mul)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = DecodeLinear(
            "gate_up", config.hidden_size, 2 * config.intermediate_size, bias=False
        )
        self.down_proj = DecodeLinear("down", config.intermediate_size, config.hidden_size, False)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, ops: AttentionOps, pointwise: Pointwise) -> None:
        super().__init__()
        self.pointwise = pointwise
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, ops, pointwise)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.norms_folded = False  # the norms' weights are in the projections (fold_norms)

    def forward(
        self,
        stream: Stream,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        next_qkv: DecodeLinear | None = None,
    ) -> Stream:
        """``next_qkv``: the next layer's QKV projection (None in the last layer), which takes
        this layer's output with the RMSNorm between them fused where ``fuses_norm``."""
        pw, norm1, norm2 = self.pointwise, self.input_layernorm, self.post_attention_layernorm
        attn, mlp = self.self_attn, self.mlp
        if stream.sums is not None:  # the last layer's output is in the stream: norm it here
            residual = stream.residual
            assert residual is not None
            qkv = attn.qkv_proj.normed(residual, stream.sums, norm1.eps)
        else:
            assert stream.x is not None
            if stream.residual is None:
                residual = stream.x
                x = pw.rms_norm(stream.x, norm1.weight, norm1.eps)
            else:
                x, residual = pw.add_rms_norm(stream.x, stream.residual, norm1.weight, norm1.eps)
            qkv = attn.qkv_proj(x)
        o = attn(qkv, cos, sin, meta)
        rows = o.shape[0]
        if self.norms_folded and fuses_norm(attn.o_proj, mlp.gate_up_proj, rows):
            residual, sums = attn.o_proj.add(o, residual)
            gate_up = mlp.gate_up_proj.normed(residual, sums, norm2.eps)
        else:
            x, residual = pw.add_rms_norm(attn.o_proj(o), residual, norm2.weight, norm2.eps)
            gate_up = mlp.gate_up_proj(x)
        x = pw.silu_and_mul(gate_up)
        if self.norms_folded and next_qkv is not None and fuses_norm(mlp.down_proj, next_qkv, rows):
            residual, sums = mlp.down_proj.add(x, residual)
            return Stream(None, residual, sums)
        return Stream(mlp.down_proj(x), residual)


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig, ops: AttentionOps, pointwise: Pointwise) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, ops, pointwise) for _ in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """Token ids and positions in, hidden states out; ``logits`` for the rows that sample."""

    # checkpoint projection -> (fused parameter, index of its part)
    PACKED: ClassVar[dict[str, tuple[str, int]]] = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    cos_sin: torch.Tensor  # a buffer: [max_positions, 2, head_dim]

    def __init__(
        self, config: ModelConfig, ops: AttentionOps, pointwise: Pointwise, max_positions: int
    ) -> None:
        super().__init__()
        self.config = config
        self.pointwise = pointwise
        self.model = DecoderModel(config, ops, pointwise)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.max_positions = max_positions
        # [max_positions, 2, head_dim], filled by ``init_rope``; shaped here so that it is laid
        # out with the weights (``WeightArena``) and parks and wakes with them.
        self.register_buffer(
            "cos_sin", torch.empty(max_positions, 2, config.head_dim), persistent=False
        )

    def init_rope(self) -> None:
        """Fill the [max_positions, 2, head_dim] cos/sin table in place (fp32 math, model dtype)."""
        inv = rope_inv_freq(self.config).to(self.model.norm.weight.device)
        pos = torch.arange(self.max_positions, device=inv.device, dtype=torch.float32)
        freqs = torch.outer(pos, inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        dtype = self.model.norm.weight.dtype
        with torch.no_grad():
            self.cos_sin.copy_(torch.stack((emb.cos(), emb.sin()), dim=1).to(dtype))

    def fold_norms(self) -> None:
        """Multiply each decoder layer's RMSNorm weight into the projection after it (QKV,
        gate/up) and set the norm's to ones; a no-op the second time. ``rms_norm(x, g) @ W.T``
        is ``rms_norm(x, 1) @ (W * g).T``, rounded once more in the model's type: so the
        skinny kernel can apply a layer's norm as one scale per row of its product
        (``skinny_matmul_normed``), its loop as plain as an unnormed product's. Every path
        (eager, prefill, decode graphs) runs the folded weights. The final norm stays: the LM
        head may be the embedding."""
        with torch.no_grad():
            for module in self.model.layers:
                layer = cast(DecoderLayer, module)
                for norm, proj in (
                    (layer.input_layernorm, layer.self_attn.qkv_proj),
                    (layer.post_attention_layernorm, layer.mlp.gate_up_proj),
                ):
                    proj.weight.mul_(norm.weight.to(proj.weight.dtype)[None, :])
                    norm.weight.fill_(1.0)
                layer.norms_folded = True

    def part_rows(self, fused: str, index: int) -> tuple[int, int]:
        """Row range of part ``index`` inside fused parameter ``fused``."""
        c = self.config
        if fused == "qkv_proj":
            sizes = [
                c.num_heads * c.head_dim,
                c.num_kv_heads * c.head_dim,
                c.num_kv_heads * c.head_dim,
            ]
        else:
            sizes = [c.intermediate_size, c.intermediate_size]
        start = sum(sizes[:index])
        return start, start + sizes[index]

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        cos_sin = self.cos_sin[positions]  # [T, 2, D]
        cos, sin = cos_sin[:, 0], cos_sin[:, 1]
        layers = cast(list[DecoderLayer], list(self.model.layers))
        stream = Stream(x, None)
        for i, layer in enumerate(layers):
            following = layers[i + 1].self_attn.qkv_proj if i + 1 < len(layers) else None
            stream = layer(stream, cos, sin, meta, following)
        norm = self.model.norm
        return self.pointwise.add_rms_norm(stream.x, stream.residual, norm.weight, norm.eps)[0]

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``hidden``; into ``out`` [rows, vocab] when given (a CUDA graph writes
        every batch size's logits into one buffer instead of keeping one per size)."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if out is None:
            return F.linear(hidden, weight)
        return torch.mm(hidden, weight.t(), out=out)
