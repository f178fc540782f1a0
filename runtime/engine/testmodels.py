"""Random-weight models in Hugging Face format, made here from a seed: nothing is downloaded.

``make_model("tiny", dir)`` writes a two-layer Llama small enough for CPU tests; the real shapes
(``llama-3-8b``, ``llama-3.2-1b``, ``qwen3-4b``) are for GPU benchmarks. Every model gets a
byte-level BPE tokenizer trained offline on a built-in corpus, with Llama-3 style special tokens
and a chat template. Weights are drawn tensor by tensor in the target dtype and written shard by
shard, so an 8B model needs one shard of host memory, never the whole model in fp32.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from berth.runtime.engine.model_config import ModelConfig

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
SPECIAL_TOKENS = [BOS, EOS, HEADER_START, HEADER_END, EOT]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    # Qwen3's switch: thinking off opens the reply with an empty thought
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)

# A few KB of varied text (prose, code, numbers, accents, CJK) for the tokenizer's merges.
_CORPUS_LINES = [
    "The harbour master assigns every ship a berth, and every berth has a depth and a length.",
    "A container ship of 300 metres waits in the roads until the tide and the cranes are ready.",
    "Pilots board at the fairway buoy; tugs push the hull against the fenders, slowly, slowly.",
    "When the quay is full, the smaller vessels raft up alongside, two or three abreast.",
    "Inference servers pack many models onto one accelerator, like ships along one long quay.",
    "Each request brings a prompt; the engine answers one token at a time, in batches.",
    "Keys and values are cached in fixed-size blocks, so memory is allocated without holes.",
    "A prefix shared by many prompts is computed once and reused from the cache afterwards.",
    "def schedule(waiting, running, budget):\n    return [seq for seq in running if seq.ready]",
    "for (int i = 0; i < n; ++i) { sum += x[i] * y[i]; }",
    "SELECT name, berth FROM ships WHERE draught < 12.5 ORDER BY arrival;",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096 8192 3.14159 2.71828",
    "Café, crème brûlée, naïve façade, Zürich, São Paulo, Kraków, Ærøskøbing, smörgåsbord.",
    "東京の港には多くの船が停泊している。横浜、神戸、大阪も大きな港です。",
    "Привет, мир! Корабль входит в порт. Γειά σου κόσμε. שלום עולם. مرحبا بالعالم",
    "Emoji travel too: 🚢 ⚓ 🌊 ✅ — and quotes “like these” and ‘these’.",
    "User: What is the capital of France?\nAssistant: The capital of France is Paris.",
    "User: Write a haiku about the sea.\nAssistant: Grey swell under fog / a horn sounds twice",
    "Q: How many blocks does a 100-token prompt need with 16 tokens per block? A: Seven.",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
    "Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail.",
    '{"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "stream": true}',
    "<html><body><p>Berth: fractional GPUs, elastic memory, warm standby.</p></body></html>",
]


def training_corpus(repeats: int = 3) -> list[str]:
    """The tokenizer's training text: the built-in lines, each also lower- and upper-cased."""
    lines: list[str] = []
    for _ in range(repeats):
        for line in _CORPUS_LINES:
            lines += [line, line.lower(), line.upper()]
    return lines


@dataclass(frozen=True)
class ModelShape:
    """The architecture hyper-parameters of one named test model."""

    architecture: str  # "llama", "qwen2", "qwen3"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    vocab_size: int | None = None  # None: the trained tokenizer's size
    rope_theta: float = 500000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-5
    tokenizer_vocab_size: int = 1024
    extra: dict[str, Any] = field(default_factory=dict)


_LLAMA_3_1_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

SHAPES: dict[str, ModelShape] = {
    "tiny": ModelShape("llama", 64, 128, 2, 4, 2, 16, 512, rope_theta=10000.0),
    "tiny-qwen2": ModelShape(
        "qwen2", 64, 128, 2, 4, 2, 16, 512, rope_theta=10000.0, rms_norm_eps=1e-6
    ),
    "tiny-qwen3": ModelShape(
        "qwen3",
        64,
        128,
        2,
        4,
        2,
        32,
        512,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
    "tiny-llama-3.2": ModelShape(
        "llama",
        64,
        128,
        2,
        4,
        2,
        16,
        512,
        rope_scaling=_LLAMA_3_1_ROPE,
        tie_word_embeddings=True,
    ),
    "llama-3-8b": ModelShape("llama", 4096, 14336, 32, 32, 8, 128, 8192, vocab_size=128256),
    "llama-3.2-1b": ModelShape(
        "llama",
        2048,
        8192,
        16,
        32,
        8,
        64,
        131072,
        vocab_size=128256,
        rope_scaling=_LLAMA_3_1_ROPE,
        tie_word_embeddings=True,
    ),
    "qwen3-4b": ModelShape(
        "qwen3",
        2560,
        9728,
        36,
        32,
        8,
        128,
        40960,
        vocab_size=151936,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
}

_ARCH_CLASS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def train_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer (Llama-3 style specials, BOS added on encode), deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    return tok


def pad_vocab(tok: Any, vocab_size: int) -> Any:
    """Fill the BPE vocabulary up to the model's size with made-up multi-byte tokens (no
    merges produce them), so every id a random model emits decodes to real bytes, as with a
    real tokenizer."""
    from tokenizers import Tokenizer, pre_tokenizers

    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    n = len(alphabet)
    i = 0
    while len(vocab) < vocab_size:
        piece = alphabet[i % n] + alphabet[(i // n) % n] + alphabet[(i // n // n) % n]
        vocab.setdefault(piece, len(vocab))
        i += 1
    return Tokenizer.from_str(json.dumps(data))


def _config_json(
    shape: ModelShape, vocab_size: int, dtype: str, bos: int, eos: list[int]
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "architectures": [_ARCH_CLASS[shape.architecture]],
        "model_type": shape.architecture,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "max_position_embeddings": shape.max_position_embeddings,
        "vocab_size": vocab_size,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_theta": shape.rope_theta,
        "rope_scaling": shape.rope_scaling,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": shape.architecture == "qwen2",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if shape.architecture == "llama":
        config["mlp_bias"] = False
    else:
        config["use_sliding_window"] = False
        config["sliding_window"] = None
        config["max_window_layers"] = shape.num_layers
    return config | shape.extra


def _random_tensor(name: str, dims: tuple[int, ...], seed: int, device: str) -> torch.Tensor:
    """Norm weights near 1, biases small, matrices scaled by fan-in (activations stay O(1))."""
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    t = torch.randn(dims, generator=gen, device=device, dtype=torch.float32)
    if name.endswith("norm.weight"):
        return t.mul_(0.1).add_(1.0)
    if name.endswith(".bias"):
        return t.mul_(0.1)
    if name == "model.embed_tokens.weight":
        return t
    return t.mul_(dims[-1] ** -0.5)


def make_model(
    name: str,
    out_dir: str | Path,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
    max_shard_bytes: int = 4 << 30,
) -> Path:
    """Write the named random-weight model (config, safetensors shards, tokenizer, chat
    template) into ``out_dir`` and return it. Same name, seed, dtype and device: same bytes."""
    from safetensors.torch import save_file

    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    shape = SHAPES[name]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = train_tokenizer(shape.tokenizer_vocab_size)
    if shape.vocab_size is not None:
        tok = pad_vocab(tok, shape.vocab_size)
    tok.save(str(out / "tokenizer.json"))
    bos = tok.token_to_id(BOS)
    eos = [tok.token_to_id(EOS), tok.token_to_id(EOT)]
    vocab_size = shape.vocab_size or tok.get_vocab_size()
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS,
                "eos_token": EOT,
                "pad_token": EOS,
                "clean_up_tokenization_spaces": False,
                "model_max_length": shape.max_position_embeddings,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
    )
    (out / "config.json").write_text(
        json.dumps(_config_json(shape, vocab_size, dtype, bos, eos), indent=2)
    )
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos, "eos_token_id": eos}, indent=2)
    )

    config = ModelConfig.from_dict(json.loads((out / "config.json").read_text()))
    weights = config.hf_weight_shapes()
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    files: list[Path] = []
    weight_map: dict[str, int] = {}
    total = 0

    def flush() -> None:
        files.append(out / f"shard-{len(files):05d}.safetensors")
        save_file(shards[-1], str(files[-1]), metadata={"format": "pt"})
        shards[-1] = {}

    for tensor_name, dims in weights.items():
        t = _random_tensor(tensor_name, dims, seed, device).to(_DTYPES[dtype]).cpu()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            flush()
            shard_bytes = 0
        shards[-1][tensor_name] = t
        weight_map[tensor_name] = len(files)
        shard_bytes += nbytes
        total += nbytes
    flush()

    n = len(files)
    if n == 1:
        files[0].rename(out / "model.safetensors")
    else:
        names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for f, new in zip(files, names, strict=True):
            f.rename(out / new)
        index = {
            "metadata": {"total_size": total},
            "weight_map": {k: names[v] for k, v in weight_map.items()},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out
