"""The Engine API the server codes against: requests, stops, aborts, streaming, stats."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from berth.runtime.engine import Engine, EngineConfig, RequestOutput, SamplingParams
from berth.runtime.engine.grammar import json_schema_grammar, regex_grammar

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _drain(engine: Engine) -> dict[str, list[RequestOutput]]:
    outs: dict[str, list[RequestOutput]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    return outs


def test_add_request_rejects_bad_input_with_named_reasons(tiny_engine: Engine) -> None:
    with pytest.raises(ValueError, match="empty"):
        tiny_engine.add_request("a", [], GREEDY)
    with pytest.raises(ValueError, match="context"):
        tiny_engine.add_request("b", [5] * tiny_engine.max_model_len, GREEDY)
    with pytest.raises(ValueError, match="top_p"):
        tiny_engine.add_request("c", "hi", SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="max_tokens"):
        tiny_engine.add_request("d", "hi", SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="token ids"):
        tiny_engine.add_request("e", [10**9], GREEDY)
    assert not tiny_engine.has_unfinished()


def test_a_pool_smaller_than_the_context_lowers_max_model_len_so_long_requests_get_a_400(
    tiny_model: Path,
) -> None:
    """8 blocks of 16 tokens hold 128 of the model's 512: a longer prompt or max_tokens is
    refused at once, naming the context, instead of starting and being aborted mid-way. A
    max_model_len asked for by name that the pool cannot hold stops the start instead."""
    with pytest.raises(ValueError, match=r"max_model_len 256 does not fit .* at most 128 tokens"):
        Engine(
            EngineConfig(
                model=str(tiny_model),
                device="cpu",
                dtype="float32",
                num_kv_blocks=8,
                max_model_len=256,
            )
        )
    engine = Engine(
        EngineConfig(model=str(tiny_model), device="cpu", dtype="float32", num_kv_blocks=8)
    )
    assert engine.max_model_len == 128
    with pytest.raises(ValueError, match="context holds 128"):
        engine.add_request("long", [5] * 200, GREEDY)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request("far", [5] * 8, SamplingParams(max_tokens=300))
    engine.add_request("fits", [5] * 100, SamplingParams(max_tokens=27, ignore_eos=True))
    out = _drain(engine)["fits"][-1]
    assert out.finish_reason == "length" and out.num_output_tokens == 27


def test_outputs_stream_tokens_and_text_and_end_with_length(tiny_engine: Engine) -> None:
    tiny_engine.add_request("r", "The harbour master", GREEDY)
    outs = _drain(tiny_engine)["r"]
    assert [len(o.new_token_ids) for o in outs] == [1] * 8
    assert [o.finished for o in outs] == [False] * 7 + [True]
    assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 8
    tokens = [t for o in outs for t in o.new_token_ids]
    assert "".join(o.new_text for o in outs) == tiny_engine.tokenizer.decode(tokens)
    assert outs[0].num_prompt_tokens == len(tiny_engine.tokenizer.encode("The harbour master"))


def test_stop_token_ids_and_eos_end_the_request(tiny_engine: Engine) -> None:
    first = tiny_engine.generate(["Call me Ishmael"], GREEDY)[0].new_token_ids
    stop_at = first[3]
    params = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[stop_at])
    out = tiny_engine.generate(["Call me Ishmael"], params)[0]
    assert out.new_token_ids == first[: first.index(stop_at) + 1]
    assert out.finish_reason == "stop"


def test_min_tokens_holds_back_stop_ids_and_eos_until_reached(tiny_engine: Engine) -> None:
    """vLLM's min_tokens: the stop id that ended the output at its 4th token cannot be chosen
    before the 6th; the greedy choice at those steps is the best token other than it."""
    first = tiny_engine.generate(["Call me Ishmael"], GREEDY)[0].new_token_ids
    stop_at = first[3]
    stops = first.index(stop_at) + 1
    params = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[stop_at], min_tokens=6)
    out = tiny_engine.generate(["Call me Ishmael"], params)[0]
    assert len(out.new_token_ids) >= 6 > stops
    assert stop_at not in out.new_token_ids[:6]
    assert out.new_token_ids[: stops - 1] == first[: stops - 1]  # the same until then
    with pytest.raises(ValueError, match="min_tokens"):
        tiny_engine.add_request("m", "hi", SamplingParams(max_tokens=4, min_tokens=5))


def test_stop_string_is_removed_and_ends_the_request(tiny_engine: Engine) -> None:
    full = tiny_engine.generate(["It was the best"], GREEDY)[0]
    assert len(full.new_text) >= 4
    stop = full.new_text[2:4]
    streamed = list(
        tiny_engine.stream("It was the best", SamplingParams(**{**GREEDY.__dict__, "stop": [stop]}))
    )
    text = "".join(o.new_text for o in streamed)
    assert text == full.new_text[: full.new_text.index(stop)]
    assert streamed[-1].finish_reason == "stop"
    kept = SamplingParams(**{**GREEDY.__dict__, "stop": [stop], "include_stop_str_in_output": True})
    text = "".join(o.new_text for o in tiny_engine.stream("It was the best", kept))
    assert text == full.new_text[: full.new_text.index(stop) + len(stop)]


def test_abort_frees_blocks_and_unknown_ids_are_ignored(tiny_engine: Engine) -> None:
    tiny_engine.add_request("x", "Pilots board at the fairway buoy", GREEDY)
    tiny_engine.step()
    assert tiny_engine.stats().num_running == 1
    assert tiny_engine.stats().num_free_blocks < tiny_engine.stats().num_total_blocks
    tiny_engine.abort_request("x")
    tiny_engine.abort_request("never-seen")
    stats = tiny_engine.stats()
    assert not tiny_engine.has_unfinished() and stats.num_running == 0
    assert stats.num_free_blocks == stats.num_total_blocks and stats.kv_cache_usage == 0.0


def test_closing_a_stream_aborts_its_request(tiny_engine: Engine) -> None:
    stream = tiny_engine.stream("Each request brings a prompt", GREEDY)
    next(stream)
    stream.close()
    assert not tiny_engine.has_unfinished()


def test_logprobs_are_the_chosen_token_and_top_n(tiny_engine: Engine) -> None:
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=2)
    out = tiny_engine.generate(["Numbers: 0 1 2"], params)[0]
    assert out.logprobs is not None and len(out.logprobs) == 3
    for token, lp in zip(out.new_token_ids, out.logprobs, strict=True):
        assert lp.token_id == token and len(lp.top) == 2
        assert lp.top[0] == (token, pytest.approx(lp.logprob))  # greedy: the best token
        assert lp.top[0][1] >= lp.top[1][1] and lp.logprob <= 0.0


def test_seeded_sampling_repeats_and_does_not_depend_on_the_batch(tiny_engine: Engine) -> None:
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=1234, ignore_eos=True)
    alone = tiny_engine.generate(["A container ship"], params)[0].new_token_ids
    other = SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)
    tiny_engine.add_request("seeded", "A container ship", params)
    tiny_engine.add_request("noise", "Something else entirely", other)
    together = [t for o in _drain(tiny_engine)["seeded"] for t in o.new_token_ids]
    assert together == alone


def test_stats_count_prefix_cache_queries_and_hits(tiny_model: Path) -> None:
    engine = Engine(EngineConfig(model=str(tiny_model), device="cpu", dtype="float32"))
    prompt = list(range(1, 40))
    engine.generate([prompt], GREEDY)
    engine.generate([prompt], GREEDY)
    stats = engine.stats()
    assert stats.prefix_cache_queries == 78 and stats.prefix_cache_hits == 32
    assert stats.kv_cache_bytes > 0 and stats.num_preemptions == 0


def test_generate_refuses_to_run_beside_other_requests(tiny_engine: Engine) -> None:
    tiny_engine.add_request("busy", "hello", GREEDY)
    with pytest.raises(RuntimeError, match="beside other requests"):
        tiny_engine.generate(["x"], GREEDY)
    tiny_engine.abort_request("busy")


def test_resize_kv_pool_preempts_and_the_request_still_completes(tiny_model: Path) -> None:
    engine = Engine(
        EngineConfig(model=str(tiny_model), device="cpu", dtype="float32", num_kv_blocks=32)
    )
    for i in range(4):
        engine.add_request(str(i), list(range(1 + i, 40 + i)), GREEDY)
    engine.step()
    preempted = engine.resize_kv_pool(8)  # the four hold blocks 0..11
    assert preempted == 2 and engine.stats().num_total_blocks == 8
    outs = _drain(engine)
    assert all(o[-1].finish_reason == "length" for o in outs.values()) and len(outs) == 4
    with pytest.raises(ValueError, match="reserved at start-up"):
        engine.resize_kv_pool(33)


def test_chat_template_renders_messages(tiny_engine: Engine) -> None:
    text = tiny_engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.startswith("<|begin_of_text|><|start_header_id|>user")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tiny_engine.tokenizer.encode(text)
    assert ids.count(tiny_engine.tokenizer.bos_token_id) == 1  # the template's BOS, not two


def test_tokens_in_flight_never_leak_and_counts_are_exact(tiny_engine: Engine) -> None:
    """Steps are pipelined: the outputs of a step are those of the batch launched before it.
    Aborting mid-flight and reusing the id yields only the new request's tokens."""
    tiny_engine.add_request("same", "A prefix shared by many prompts", GREEDY)
    tiny_engine.step()  # launched, nothing back yet
    tiny_engine.step()
    tiny_engine.abort_request("same")
    tiny_engine.add_request("same", "Keys and values are cached", GREEDY)
    outs = _drain(tiny_engine)["same"]
    tokens = [t for o in outs for t in o.new_token_ids]
    alone = tiny_engine.generate(["Keys and values are cached"], GREEDY)[0]
    assert tokens == alone.new_token_ids and all(t >= 0 for t in tokens)
    assert [o.num_output_tokens for o in outs] == list(range(1, 9))
    assert tiny_engine.stats().num_free_blocks == tiny_engine.stats().num_total_blocks


def test_every_step_launches_before_it_collects_and_a_grammar_only_moves_the_draw(
    tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each step launches its batch before it collects the previous one's tokens, whatever
    the requests ask for: a sampled or penalized request's tokens are drawn right after the
    launch (penalties count on the device); while a request with a grammar is live, right
    after the collection (its mask follows the tokens just collected), with the batch already
    running. A seeded request beside any kind of companion draws the same tokens,
    log-probabilities and min_tokens ban."""
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=11, logprobs=2,
                            min_tokens=4)  # fmt: skip
    events: list[str] = []
    for name in ("_launch", "_collect", "_draw"):
        method = getattr(tiny_engine, name)

        def recorded(*args: object, _name: str = name, _method: Any = method) -> Any:
            events.append(_name)
            return _method(*args)

        monkeypatch.setattr(tiny_engine, name, recorded)
    runs = {}
    for name, companion in [
        ("sampled", SamplingParams(max_tokens=12, temperature=0.7, ignore_eos=True)),
        (
            "penalized",
            SamplingParams(
                max_tokens=12, presence_penalty=0.5, repetition_penalty=1.2, ignore_eos=True
            ),
        ),
        ("grammar", SamplingParams(max_tokens=12, grammar=json_schema_grammar({"type": "object"}))),
    ]:
        tiny_engine.add_request("x", "A container ship", seeded)
        tiny_engine.add_request("y", "Something else entirely", companion)
        outs: dict[str, list[RequestOutput]] = {}
        steps = []  # per step: the order of its launch, collection and draw
        while tiny_engine.has_unfinished():
            events.clear()
            for out in tiny_engine.step():
                outs.setdefault(out.request_id, []).append(out)
            steps.append(tuple(events))
        tokens = [t for o in outs["x"] for t in o.new_token_ids]
        logprobs = [lp for o in outs["x"] for lp in o.logprobs or []]
        ids = [[lp.token_id] + [t for t, _ in lp.top] for lp in logprobs]
        values = [v for lp in logprobs for v in [lp.logprob] + [v for _, v in lp.top]]
        runs[name] = (tokens, ids, values, steps)
    tokens, ids, values, steps = runs["sampled"]
    assert len(tokens) >= 4 and [i[0] for i in ids] == tokens
    assert ("_launch", "_draw", "_collect") in steps
    assert all(
        s.index("_launch") < s.index("_collect")
        for s in steps
        if "_collect" in s and "_launch" in s
    )
    for name in ("penalized", "grammar"):
        other_tokens, other_ids, other_values, _ = runs[name]
        assert other_tokens == tokens and other_ids == ids, name
        assert other_values == pytest.approx(values, abs=1e-5), name
    grammar_steps = runs["grammar"][3]
    assert ("_launch", "_collect", "_draw") in grammar_steps
    assert ("_launch", "_draw", "_collect") not in grammar_steps
    penalized_steps = runs["penalized"][3]
    assert ("_launch", "_draw", "_collect") in penalized_steps
    assert ("_launch", "_collect", "_draw") not in penalized_steps


def test_penalized_requests_keep_their_counts_through_preemption(tiny_model: Path) -> None:
    """Six greedy requests with presence, frequency and repetition penalties on a pool too
    small for the four that run at once: they are preempted and computed again, their count
    rows kept meanwhile (``test_token_counts`` covers a row taken from a waiting sequence and
    refilled). Each output equals the same request's alone on a roomy engine, and every row
    is free at the end."""
    params = [
        SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, presence_penalty=0.8,
                       frequency_penalty=0.3 * (i % 2), repetition_penalty=1.0 + 0.2 * (i % 3))
        for i in range(6)
    ]  # fmt: skip
    prompts = [[(7 * i + j) % 97 + 3 for j in range(20 + i)] for i in range(6)]
    tight = Engine(EngineConfig(model=str(tiny_model), device="cpu", dtype="float32",
                                num_kv_blocks=12, max_num_seqs=4))  # fmt: skip
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        tight.add_request(str(i), prompt, p)
    got = {rid: [t for o in outs for t in o.new_token_ids] for rid, outs in _drain(tight).items()}
    assert tight.stats().num_preemptions > 0
    assert tight.runner.token_counts.num_held == 0
    roomy = Engine(EngineConfig(model=str(tiny_model), device="cpu", dtype="float32"))
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        assert got[str(i)] == roomy.generate([prompt], p)[0].new_token_ids, i


def test_a_penalized_request_stopped_before_a_grammars_draw_leaves_no_row(
    tiny_engine: Engine,
) -> None:
    """While a grammar is live the draw follows the collection, so a penalized request that
    the collection just stopped is still in the launched batch beside another penalized one:
    it gets no count row (its token is dropped), and every row is free once the engine
    drains."""
    penalized = SamplingParams(max_tokens=12, temperature=0.0, presence_penalty=0.5)
    free = tiny_engine.generate(["The harbour master"], penalized)[0].new_token_ids
    stop = dataclasses.replace(penalized, stop_token_ids=[free[2]])
    tiny_engine.add_request("p", "The harbour master", stop)
    going_on = dataclasses.replace(penalized, max_tokens=30, ignore_eos=True)
    tiny_engine.add_request("q", "Pilots board", going_on)  # keeps the selection running
    long_lived = SamplingParams(max_tokens=40, grammar=regex_grammar("[a-z ]{400,500}"))
    tiny_engine.add_request("g", "Letters:", long_lived)
    outs = _drain(tiny_engine)
    assert outs["p"][-1].finish_reason == "stop" and outs["g"][-1].finish_reason == "length"
    assert len(outs["p"]) < len(outs["g"])  # the grammar was live when p stopped
    assert tiny_engine.runner.token_counts.num_held == 0
