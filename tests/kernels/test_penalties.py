"""The penalties kernel against the sampler's rule in torch's operators (its reference): rows
in any order, a subset of the batch, counts with and without the prompt's bit, ids past the
last full block."""

from __future__ import annotations

import pytest
import torch

from berth.kernels.penalties import penalize_
from berth.runtime.engine.sampler import penalize
from berth.runtime.engine.token_counts import OUTPUT_COUNT, PROMPT_BIT, PenaltyRows


def _case(
    batch: int, rows: int, vocab: int, device: torch.device, seed: int
) -> tuple[torch.Tensor, PenaltyRows]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, vocab, generator=g) * 4
    outputs = torch.randint(0, 4, (rows, vocab), generator=g, dtype=torch.int32)
    outputs *= torch.rand(rows, vocab, generator=g) < 0.1  # most ids never came out
    in_prompt = torch.rand(rows, vocab, generator=g) < 0.05
    table = (outputs + in_prompt.int() * PROMPT_BIT).int()
    penalized = torch.randperm(batch, generator=g)[: max(1, batch // 2)]
    at_table = torch.randperm(rows, generator=g)[: len(penalized)]
    settings = torch.stack(
        [
            torch.rand(len(penalized), generator=g) * 4 - 2,  # frequency
            torch.rand(len(penalized), generator=g) * 4 - 2,  # presence
            torch.rand(len(penalized), generator=g) * 2 + 0.5,  # repetition
        ],
        dim=1,
    )
    to = {"device": device}
    rows_view = PenaltyRows(
        table.to(**to), penalized.tolist(), penalized.to(**to), at_table.to(**to),
        settings.to(**to), (at_table * vocab).to(**to), torch.ones(len(penalized), dtype=torch.int32, **to),
    )  # fmt: skip
    return x.to(**to), rows_view


@pytest.mark.parametrize("repetition", [True, False])
@pytest.mark.parametrize(("batch", "rows", "vocab"), [(3, 4, 5000), (8, 8, 4096), (5, 9, 70)])
def test_the_kernel_applies_the_samplers_rule(
    device: torch.device, repetition: bool, batch: int, rows: int, vocab: int
) -> None:
    x, penalties = _case(batch, rows, vocab, device, seed=batch * 100 + vocab)
    if not repetition:
        penalties.settings[:, 2] = 1.0
    want = x.clone()
    penalize(want, penalties, repetition)
    got = x.clone()
    penalize_(got, penalties.table, penalties.settings, penalties.at_batch, penalties.at_table,
              OUTPUT_COUNT)  # fmt: skip
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-5)
    untouched = [i for i in range(batch) if i not in penalties.batch_rows]
    assert torch.equal(got[untouched], x[untouched])
    assert not torch.equal(got, x)


@pytest.mark.gpu
def test_the_kernel_at_a_full_vocabulary_and_batch(device: torch.device) -> None:
    x, penalties = _case(256, 256, 128256, device, seed=1)
    want = x.clone()
    penalize(want, penalties, True)
    penalize_(x, penalties.table, penalties.settings, penalties.at_batch, penalties.at_table,
              OUTPUT_COUNT)  # fmt: skip
    assert torch.allclose(x, want, rtol=1e-6, atol=1e-5)


def test_the_kernel_refuses_other_dtypes(device: torch.device) -> None:
    x, penalties = _case(2, 2, 64, device, seed=0)
    with pytest.raises(TypeError, match="float32 logits and int32 counts"):
        penalize_(x.half(), penalties.table, penalties.settings, penalties.at_batch,
                  penalties.at_table, OUTPUT_COUNT)  # fmt: skip
