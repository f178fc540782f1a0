"""Sampling rules on hand-made logits: greedy, temperature, top-k, top-p, min-p, seeds,
OpenAI's penalties and logit bias."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from berth.runtime.engine.config import SamplingParams
from berth.runtime.engine.sampler import Sampler

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


def _openai_adjusted(
    logits: torch.Tensor, params: SamplingParams, output: list[int]
) -> torch.Tensor:
    """OpenAI's definition, one token id at a time: logit - frequency x count - presence x
    (count > 0) + bias."""
    x = logits.double().clone()
    for token in set(output):
        count = output.count(token)
        x[token] -= count * params.frequency_penalty + (count > 0) * params.presence_penalty
    for token, bias in params.logit_bias.items():
        x[token] += bias
    return x


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    rows=st.lists(
        st.tuples(
            st.floats(-2, 2),
            st.floats(-2, 2),
            st.dictionaries(st.integers(0, 31), st.floats(-100, 100), max_size=4),
            st.lists(st.integers(0, 31), max_size=12),
        ),
        min_size=1,
        max_size=5,
    ),
)
def test_penalties_and_logit_bias_choose_as_openai_defines_them(
    seed: int, rows: list[tuple[float, float, dict[int, float], list[int]]]
) -> None:
    """Greedy rows, some with penalties or a bias and some without, in one batch: each takes
    the argmax of its own adjusted logits; the log-probabilities stay the model's."""
    logits = torch.randn(len(rows), 32, generator=torch.Generator().manual_seed(seed)) * 3
    params = [
        SamplingParams(temperature=0.0, presence_penalty=p, frequency_penalty=f, logit_bias=b,
                       logprobs=0)
        for p, f, b, _ in rows
    ]  # fmt: skip
    outputs = [out for *_, out in rows]
    tokens, logprobs = Sampler(torch.device("cpu"), 0)(logits, params, [None] * len(rows),
                                                        outputs=outputs)  # fmt: skip
    assert logprobs is not None
    for i, (row_params, output) in enumerate(zip(params, outputs, strict=True)):
        want = _openai_adjusted(logits[i], row_params, output)
        assert want[tokens[i]] >= want.max() - 1e-4, (i, tokens[i], int(want.argmax()))
        row_logprob = logprobs[i]
        assert row_logprob is not None
        assert abs(row_logprob.logprob - float(logits[i].log_softmax(-1)[tokens[i]])) < 1e-5


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
        (SamplingParams(logit_bias={-1: 1.0}), "logit_bias keys"),
        (SamplingParams(logit_bias={5: 100.5}), "logit_bias values"),
    ):
        with pytest.raises(ValueError, match=field):
            bad.validate(512)
