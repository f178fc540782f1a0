"""The engine on an FP8 KV cache: twice the blocks per byte of a 16-bit cache, the same first
tokens (a prompt's own keys are never quantized), the same outputs through preemption and
prefix-cache hits as far as e4m3 allows, and on the real SmolLM2 the quality measured."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch

from berth.runtime.engine import Engine, EngineConfig, SamplingParams
from berth.runtime.engine.gguf_import import import_model
from berth.runtime.engine.kv_arena import KvArena, KvLayout


def _engine(model: Path, kv: str, **kw: object) -> Engine:
    config = EngineConfig(model=str(model), device="cpu", dtype="float32", kv_cache_dtype=kv, **kw)  # type: ignore[arg-type]
    return Engine(config)


def test_fp8_holds_four_times_the_blocks_of_an_fp32_cache_less_its_scales(
    tiny_model: Path,
) -> None:
    full = _engine(tiny_model, "auto", kv_cache_bytes=8 << 20)
    fp8 = _engine(tiny_model, "fp8", kv_cache_bytes=8 << 20)
    layout = fp8.runner.layout
    assert layout.fp8 and layout.slab_block_bytes * 4 == full.runner.layout.slab_block_bytes
    assert layout.chunk_blocks <= 4 * full.runner.layout.chunk_blocks  # chunks no coarser
    ratio = fp8.runner.num_kv_blocks / full.runner.num_kv_blocks
    head_dim = layout.head_dim
    assert ratio == pytest.approx(4 * head_dim / (head_dim + 4), rel=0.02)
    attn = fp8.runner.model.model.layers[0].self_attn
    assert attn.k_cache.dtype == torch.float8_e4m3fn and attn.k_scale is not None


def test_fp8_engine_follows_the_full_precision_one(tiny_model: Path) -> None:
    """Shared prefixes (prefix-cache hits read quantized blocks) and a pool small enough to
    preempt: greedy outputs agree with the fp32 cache's, first tokens exactly."""
    shared = [(11 * j) % 300 + 2 for j in range(48)]
    prompts = [shared + [(7 * i + j) % 400 + 1 for j in range(5 + 9 * i)] for i in range(8)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outs = {}
    for kv in ("auto", "fp8"):
        engine = _engine(tiny_model, kv, num_kv_blocks=40, max_num_seqs=8)
        outs[kv] = [o.new_token_ids for o in engine.generate(list(prompts), params)]
        if kv == "fp8":
            assert engine.scheduler.prefix_cache_hits > 0
    firsts = [o[0] for o in outs["auto"]], [o[0] for o in outs["fp8"]]
    assert firsts[0] == firsts[1]
    same = sum(
        x == y
        for a, b in zip(outs["auto"], outs["fp8"], strict=True)
        for x, y in zip(a, b, strict=True)
    )
    assert same >= 0.8 * 24 * len(prompts), outs


def _chat(engine: Engine, question: str) -> list[int]:
    text = engine.tokenizer.apply_chat_template([{"role": "user", "content": question}])
    return engine.tokenizer.encode(text)


def test_fp8_kv_quality_on_smollm2() -> None:
    """The real SmolLM2-135M-Instruct, greedy, 48 tokens for each of four questions: the share
    of tokens equal to the fp32 cache's, and the mean |log-probability difference| of the
    chosen tokens up to the first divergence (printed for the record; bounds with margin)."""
    model = import_model("smollm2", say=lambda _: None)
    questions = [
        "What is the capital of France?",
        "Name three colours of the rainbow.",
        "Write one sentence about the sea.",
        "Explain in two sentences why the sky is blue.",
    ]
    params = SamplingParams(max_tokens=48, temperature=0.0, logprobs=0)
    runs = {}
    for kv in ("auto", "fp8"):
        engine = _engine(model, kv)
        prompts = [_chat(engine, q) for q in questions]
        runs[kv] = engine.generate(prompts, params)
    prefix_lens: list[int] = []  # tokens equal before the first divergence, per answer
    errors: list[float] = []
    for a, b in zip(runs["auto"], runs["fp8"], strict=True):
        assert a.logprobs is not None and b.logprobs is not None
        same = 0
        for x, y in zip(a.logprobs, b.logprobs, strict=False):
            if x.token_id != y.token_id:
                break
            same += 1
            errors.append(abs(x.logprob - y.logprob))
        prefix_lens.append(same)
        print(
            repr(engine.tokenizer.decode(a.new_token_ids)),
            "|",
            repr(engine.tokenizer.decode(b.new_token_ids)),
        )
    mean_err = statistics.mean(errors)
    print(f"SmolLM2, fp8 KV vs fp32 KV: equal greedy tokens before the first divergence "
          f"{prefix_lens} (of {[len(a.new_token_ids) for a in runs['auto']]}); "
          f"mean |dlogprob| of the chosen tokens there {mean_err:.4f}")  # fmt: skip
    assert min(prefix_lens) >= 4 and mean_err < 0.1


def test_fp8_chunks_stay_fine_grained_and_carry_their_scales() -> None:
    """Llama-3-8B's layout on a 2 MiB granule: 128 blocks a chunk (bf16: 64), about 132 MiB;
    on the CPU arena a chunk's scales are backed, zeroed, copied and freed with its values."""
    gpu = KvLayout(32, 16, 8, 128, 1, 2 << 20, fp8=True)
    assert gpu.chunk_blocks == 128 and gpu.chunk_bytes == 128 * (64 * 16384 + 16 * 2048)
    assert KvLayout(32, 16, 8, 128, 2, 2 << 20).chunk_blocks == 64
    layout = KvLayout(2, 4, 2, 16, 1, 1024, fp8=True)
    arena = KvArena(layout, 3, torch.device("cpu"), torch.float32)
    assert arena.tensor.dtype == torch.float8_e4m3fn and arena.scales is not None
    arena.resize(1)
    blocks = layout.chunk_blocks
    k, _, k_scale, _ = arena.layer_caches(1)
    assert k_scale is not None
    k[0].fill_(2.0)
    k_scale[0].fill_(0.5)
    arena.copy_blocks(torch.tensor([0]), torch.tensor([blocks - 1]))
    assert k_scale[blocks - 1].eq(0.5).all() and k[blocks - 1].float().eq(2.0).all()
    arena.resize(2)
    assert k_scale[blocks : 2 * blocks].eq(0).all()  # a new chunk reads as zeros
    arena.resize(0)
    assert arena.scales.untyped_storage().nbytes() == 0  # parked: nothing held


def test_an_fp8_engine_parks_and_wakes_with_the_same_outputs(tiny_model: Path) -> None:
    engine = _engine(tiny_model, "fp8", standby=True)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    before = [o.new_token_ids for o in engine.generate(list(prompts), params)]
    engine.park()
    assert engine.runner.arena.scales is not None
    assert engine.runner.arena.scales.untyped_storage().nbytes() == 0  # scales freed too
    engine.wake()
    assert [o.new_token_ids for o in engine.generate(list(prompts), params)] == before
