"""Sampling rules on hand-made logits: greedy, temperature, top-k, top-p, min-p, seeds,
OpenAI's penalties, the repetition penalty and logit bias."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from berth.runtime.engine.config import SamplingParams
from berth.runtime.engine.sampler import Sampler
from berth.runtime.engine.sequence import Sequence
from berth.runtime.engine.token_counts import TokenCounts

# Probabilities 0.5, 0.25, 0.15, 0.1 over tokens 3, 1, 0, 2.
LOGITS = torch.log(torch.tensor([[0.15, 0.25, 0.10, 0.50]]))


def _draw(params: SamplingParams, n: int = 400, seed: int = 0) -> set[int]:
    sampler = Sampler(torch.device("cpu"), seed)
    logits = LOGITS.expand(n, -1).contiguous()
    tokens, _ = sampler(logits, [params] * n, [None] * n)
    return set(tokens)


def test_greedy_and_top_k_1_take_the_argmax() -> None:
    assert _draw(SamplingParams(temperature=0.0)) == {3}
    assert _draw(SamplingParams(top_k=1)) == {3}


def test_plain_sampling_reaches_every_token() -> None:
    assert _draw(SamplingParams()) == {0, 1, 2, 3}


def test_top_k_top_p_and_min_p_truncate_the_tail() -> None:
    assert _draw(SamplingParams(top_k=2)) == {3, 1}
    assert _draw(SamplingParams(top_p=0.7)) == {3, 1}  # 0.5 + 0.25 covers 0.7
    assert _draw(SamplingParams(top_p=0.45)) == {3}
    assert _draw(SamplingParams(min_p=0.4)) == {3, 1}  # floor 0.2: keeps 0.5 and 0.25


def test_low_temperature_sharpens_towards_the_argmax() -> None:
    assert _draw(SamplingParams(temperature=0.01)) == {3}


def test_a_seeded_row_does_not_depend_on_its_neighbours() -> None:
    sampler = Sampler(torch.device("cpu"), 0)
    params = SamplingParams(seed=7)
    logits = torch.randn(3, 50)
    alone = [sampler(logits[1:2], [params], [sampler.request_generator(7)])[0][0] for _ in range(5)]
    mixed = [
        sampler(
            logits,
            [SamplingParams(), params, SamplingParams()],
            [None, sampler.request_generator(7), None],
        )[0][1]
        for _ in range(5)
    ]
    assert alone == mixed


def test_logprobs_match_log_softmax() -> None:
    sampler = Sampler(torch.device("cpu"), 0)
    tokens, logprobs = sampler(LOGITS, [SamplingParams(temperature=0.0, logprobs=3)], [None])
    assert logprobs is not None and logprobs[0] is not None
    lp = logprobs[0]
    ref = LOGITS.log_softmax(-1)[0]
    assert lp.token_id == tokens[0] == 3
    assert abs(lp.logprob - float(ref[3])) < 1e-6
    assert [t for t, _ in lp.top] == [3, 1, 0]


def test_sampling_in_place_leaves_the_callers_logits_alone() -> None:
    """The random path works in place on one float32 copy; float32 logits (the CPU's) must not
    be that copy, since greedy rows and log-probabilities read them afterwards."""
    sampler = Sampler(torch.device("cpu"), 0)
    logits = torch.randn(4, 50)
    before = logits.clone()
    params = [SamplingParams(temperature=0.5, min_p=0.1), SamplingParams(temperature=0, logprobs=2)]
    params *= 2
    tokens, logprobs = sampler(logits, params, [None] * 4)
    assert torch.equal(logits, before)
    assert tokens[1] == int(before[1].argmax()) and tokens[3] == int(before[3].argmax())
    assert logprobs is not None and logprobs[1] is not None
    assert abs(logprobs[1].logprob - float(before[1].log_softmax(-1).max())) < 1e-6


def _reference_adjusted(
    logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int]
) -> torch.Tensor:
    """The definitions, one token id at a time, in vLLM's order: + bias, then transformers'
    repetition penalty over the prompt and output (a positive logit divided, a negative one
    multiplied), then OpenAI's logit - frequency x count - presence x (count > 0)."""
    x = logits.double().clone()
    for token, bias in params.logit_bias.items():
        x[token] += bias
    for token in set(prompt) | set(output):
        r = params.repetition_penalty
        x[token] = x[token] / r if x[token] > 0 else x[token] * r
    for token in set(output):
        count = output.count(token)
        x[token] -= count * params.frequency_penalty + (count > 0) * params.presence_penalty
    return x


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    rows=st.lists(
        st.tuples(
            st.floats(-2, 2),
            st.floats(-2, 2),
            st.sampled_from([1.0, 0.5, 1.3, 3.0]),
            st.dictionaries(st.integers(0, 31), st.floats(-100, 100), max_size=4),
            st.lists(st.integers(0, 31), min_size=1, max_size=6),
            st.lists(st.integers(0, 31), max_size=12),
        ),
        min_size=1,
        max_size=5,
    ),
)
def test_penalties_and_logit_bias_choose_as_defined(
    seed: int, rows: list[tuple[float, float, float, dict[int, float], list[int], list[int]]]
) -> None:
    """Greedy rows, some with penalties or a bias and some without, in one batch, the counts
    in the device table's rows (a row each, filled from the sequence): each takes the argmax
    of its own adjusted logits; the log-probabilities stay the model's; the chosen ids are
    counted in the rows."""
    logits = torch.randn(len(rows), 32, generator=torch.Generator().manual_seed(seed)) * 3
    params = [
        SamplingParams(temperature=0.0, presence_penalty=p, frequency_penalty=f,
                       repetition_penalty=r, logit_bias=b, logprobs=0)
        for p, f, r, b, *_ in rows
    ]  # fmt: skip
    seqs = [
        Sequence(str(i), [*prompt, *output], len(prompt), row_params, 64)
        for i, (row_params, (*_, prompt, output)) in enumerate(zip(params, rows, strict=True))
    ]
    counts = TokenCounts(8, 32, torch.device("cpu"))
    penalties = counts.select(seqs, [len(s.token_ids) for s in seqs])
    tokens, logprobs = Sampler(torch.device("cpu"), 0)(logits, params, [None] * len(rows),
                                                        penalties=penalties)  # fmt: skip
    assert logprobs is not None
    for i, (row_params, seq) in enumerate(zip(params, seqs, strict=True)):
        prompt, output = seq.token_ids[: seq.num_prompt_tokens], seq.output_token_ids
        want = _reference_adjusted(logits[i], row_params, prompt, output)
        assert want[tokens[i]] >= want.max() - 1e-4, (i, tokens[i], int(want.argmax()))
        row_logprob = logprobs[i]
        assert row_logprob is not None
        assert abs(row_logprob.logprob - float(logits[i].log_softmax(-1)[tokens[i]])) < 1e-5
        if row_params.penalized:  # the draw counted its id: the row now holds output + it
            seq.token_ids.append(tokens[i])
            fresh = TokenCounts(1, 32, torch.device("cpu"))
            fresh.select([seq], [len(seq.token_ids)])
            assert torch.equal(counts.table[counts.row_of(seq)], fresh.table[0])


def test_a_bias_of_minus_100_bans_a_token_and_plus_100_forces_one() -> None:
    sampler = Sampler(torch.device("cpu"), 0)
    banned = SamplingParams(logit_bias={3: -100.0})  # token 3 holds half the mass
    tokens, _ = sampler(LOGITS.expand(400, -1).contiguous(), [banned] * 400, [None] * 400)
    assert 3 not in tokens and set(tokens) == {0, 1, 2}
    forced = SamplingParams(logit_bias={2: 100.0})
    tokens, _ = sampler(LOGITS.expand(50, -1).contiguous(), [forced] * 50, [None] * 50)
    assert set(tokens) == {2}


def test_penalties_and_bias_are_validated_naming_the_field() -> None:
    for bad, field in (
        (SamplingParams(presence_penalty=2.5), "presence_penalty"),
        (SamplingParams(frequency_penalty=float("nan")), "frequency_penalty"),
        (SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
        (SamplingParams(repetition_penalty=float("inf")), "repetition_penalty"),
        (SamplingParams(logit_bias={-1: 1.0}), "logit_bias keys"),
        (SamplingParams(logit_bias={5: 100.5}), "logit_bias values"),
    ):
        with pytest.raises(ValueError, match=field):
            bad.validate(512)
