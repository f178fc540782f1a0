"""The two settings objects a caller hands the engine: one per engine, one per request."""

from __future__ import annotations

from dataclasses import dataclass, field

from berth.runtime.engine.budget import GpuBudget

# ``EngineConfig.decode_blas``: measured per batch size, or one library for every decode graph.
DECODE_BLAS = ("measured", "cublas", "cublaslt")
# The most alternatives ``logprobs`` and ``prompt_logprobs`` may ask for (OpenAI's and vLLM's
# default bound): each costs a top-k over the vocabulary and a host entry per token.
MAX_LOGPROBS = 20


@dataclass
class EngineConfig:
    """How to load one model and size its KV cache and batches; read once at start-up.

    ``num_kv_blocks`` wins over ``kv_cache_bytes``; with neither, the KV pool is sized from
    ``budget`` (the pod's GPU share: ``request - weights - workspace``, measured at start-up,
    growing toward the limit when the node agent grants it), and without a budget from the
    whole device's free memory on the GPU, or ``CPU_KV_CACHE_BYTES`` on the CPU (local use).
    """

    model: str
    dtype: str = "auto"  # "auto" (the checkpoint's), "bfloat16", "float16", "float32"
    # "auto": the KV cache in the model's dtype; "fp8": e4m3 with a scale per token and KV head
    # (half the bytes of bf16: twice the context per GB)
    kv_cache_dtype: str = "auto"
    device: str = "auto"  # "auto" (cuda when available), "cuda", "cuda:N", "cpu"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None
    kv_cache_bytes: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # per-step token budget (chunked prefill)
    # While sequences decode, a step computes at most this many prompt tokens besides them, so
    # that a burst of prompts lengthens each decode step by a bounded amount (None: no cap);
    # raised to fill the step's CUDA graph, whose padded rows are computed anyway.
    max_prefill_tokens_while_decoding: int | None = 512
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # no CUDA graphs
    # Prefill/mixed steps of up to this many tokens replay CUDA graphs (0: they run eagerly).
    max_prefill_graph_tokens: int = 2048
    # The BLAS library of the decode graphs' matmuls: "measured" (per batch size, whichever of
    # cuBLAS and cuBLASLt ran the model's matmuls faster at start-up, and up to 16 rows Berth's
    # skinny kernel for each kind of projection it ran faster), "cublas" or "cublaslt" (every
    # decode graph on that library alone).
    decode_blas: str = "measured"
    seed: int = 0
    budget: GpuBudget | None = None  # the pod's GPU memory share (``budget.read_budget``)
    standby: bool = False  # keep a host copy of the weights so the engine can park and wake

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting that cannot work."""
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError(
                f"max_num_batched_tokens must be >= block_size ({self.block_size}), "
                f"got {self.max_num_batched_tokens}"
            )
        cap = self.max_prefill_tokens_while_decoding
        if cap is not None and cap < 1:
            raise ValueError(f"max_prefill_tokens_while_decoding must be >= 1, got {cap}")
        if self.max_prefill_graph_tokens < 0:
            raise ValueError(
                f"max_prefill_graph_tokens must be >= 0, got {self.max_prefill_graph_tokens}"
            )
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be >= 1, got {self.kv_cache_bytes}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"kv_cache_dtype must be auto or fp8, got {self.kv_cache_dtype!r}")
        if self.decode_blas not in DECODE_BLAS:
            raise ValueError(
                f"decode_blas must be measured, cublas or cublaslt, got {self.decode_blas!r}"
            )
        if self.dtype not in ("auto", "bfloat16", "float16", "float32", "bf16", "fp16", "fp32"):
            raise ValueError(
                f"dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}"
            )


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop, for one request."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    seed: int | None = None  # per-request generator; None: the engine's
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False  # vLLM's: the text ends after the stop string
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # vLLM's: no end-of-sequence, stop token id or stop string ends the output before this many
    # tokens (the sampler masks the stop ids until then).
    min_tokens: int = 0
    logprobs: int | None = None  # None: none; N >= 0: the chosen token's plus the top N
    # vLLM's: None: none; N >= 0: every prompt token's log-probability (the first has none)
    # and the top N alternatives at its position. Such a request skips the prefix cache (a
    # cached position has no logits).
    prompt_logprobs: int | None = None
    # OpenAI's: each token id's logit is lowered by frequency_penalty times the times the
    # output holds it, and by presence_penalty once if it holds it at all; logit_bias adds to
    # the logits of the ids it names. The choice sees them; log-probabilities do not.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's and transformers': the logit of every id the prompt or the output holds is
    # divided by it where positive, multiplied where negative (> 1 discourages repeats).
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    # An llguidance grammar (``LLMatcher.grammar_from_json_schema`` and the like): every token
    # chosen keeps the output a prefix of a valid one (OpenAI's response_format).
    grammar: str | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        """A presence, frequency or repetition penalty counts the tokens so far."""
        return bool(self.presence_penalty or self.frequency_penalty) or (
            self.repetition_penalty != 1.0
        )

    @property
    def host_bound(self) -> bool:
        """Each choice needs every token before it on the host: a grammar's mask follows
        them (penalties count them on the device, ``token_counts``)."""
        return self.grammar is not None

    @property
    def adjusts_logits(self) -> bool:
        """A penalty or a bias changes the logits the choice is made from."""
        return self.penalized or bool(self.logit_bias)

    def validate(self, max_model_len: int) -> None:
        """Raise ``ValueError`` with a message that names the offending parameter."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.max_tokens > max_model_len:
            raise ValueError(
                f"max_tokens ({self.max_tokens}) exceeds the model's context length "
                f"({max_model_len})"
            )
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                f"got {self.min_tokens!r}"
            )
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(
                f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            whole = isinstance(value, int) and not isinstance(value, bool)
            if value is not None and not (whole and 0 <= value <= MAX_LOGPROBS):
                raise ValueError(
                    f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {value!r}"
                )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and -2.0 <= value <= 2.0):
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        rep = self.repetition_penalty
        if not (isinstance(rep, int | float) and 0.0 < rep < float("inf")):
            raise ValueError(f"repetition_penalty must be a number > 0 (1: off), got {rep!r}")
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids >= 0, got {token!r}")
            if not (isinstance(bias, int | float) and -100.0 <= bias <= 100.0):
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias!r} "
                                 f"for token {token}")  # fmt: skip
        if self.grammar is not None and self.min_tokens:
            raise ValueError(
                "min_tokens cannot be combined with a structured output (response_format, "
                "structured_outputs or a constrained tool call): the end-of-sequence token that "
                "a complete one needs would be held back"
            )
