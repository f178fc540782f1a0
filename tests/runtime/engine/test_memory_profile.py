"""What a runtime may hold besides its KV cache: the allocator's slack is counted in the
workspace, the profile runs the eager functions (what a step too large for a graph runs), and
on a GPU under a budget torch's caching allocator is held to the measured limit, so that cached
blocks are freed before the process reserves past its share."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from berth.runtime.engine import Engine, EngineConfig, sampler
from berth.runtime.engine.budget import GpuBudget
from berth.runtime.engine.layers import Pointwise, rms_norm
from berth.runtime.engine.memory_profile import (
    MIN_ALLOCATOR_SLACK,
    allocator_slack,
    cap_allocator,
    measure_footprint,
    profile_largest_step,
)

MIB = 1 << 20


def test_slack_is_an_eighth_of_the_peak_and_at_least_the_minimum() -> None:
    assert allocator_slack(0) == MIN_ALLOCATOR_SLACK
    assert allocator_slack(512 * MIB) == MIN_ALLOCATOR_SLACK
    assert allocator_slack(4096 * MIB) == 512 * MIB


def test_a_cpu_footprint_is_the_weights_alone() -> None:
    fp = measure_footprint(torch.device("cpu"), 123, 456)
    assert (fp.weights_bytes, fp.workspace_bytes, fp.allocator_limit_bytes) == (123, 0, 0)
    cap_allocator(torch.device("cpu"), 1)  # nothing to hold on the CPU


def test_the_profiled_draw_takes_every_path_that_holds_a_copy_of_the_logits(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Penalties and bias, a min_tokens ban and a grammar's mask each hold a [rows, vocab]
    copy: the profile's draw goes through all of them, at the largest batch, so the measured
    peak (and the allocator's limit under a budget) covers a step that needs them. The token
    counts' table is the runner's own (allocated before, so measured too), left zeroed."""
    seen: dict[str, int] = {}
    for name in ("_adjusted", "_mask", "allowed_only"):
        real = getattr(sampler, name)

        def spy(*args, _real=real, _name=name, **kwargs):  # type: ignore[no-untyped-def]
            seen[_name] = args[0].shape[0]
            return _real(*args, **kwargs)

        monkeypatch.setattr(sampler, name, spy)
    engine = Engine(EngineConfig(model=str(tiny_model), device="cpu", max_num_seqs=8))
    runner = engine.runner
    runner.token_counts.table.fill_(7)
    profile_largest_step(runner.model, engine.config, engine.max_model_len,
                         runner.max_blocks_per_seq, runner.token_counts)  # fmt: skip
    assert seen == {"_adjusted": 8, "_mask": 8, "allowed_only": 8}
    assert not runner.token_counts.table.any()  # the profile's counts do not stay behind


def test_eager_for_now_swaps_the_functions_back() -> None:
    def fused(*args: object) -> None:
        raise AssertionError("the fused function ran inside the block")

    pw = Pointwise(fused, fused, fused, fused, fused, is_compiled=True)
    with pw.eager_for_now():
        assert pw.rms_norm is rms_norm and not pw.is_compiled
        pw.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-6)
    assert pw.rms_norm is fused and pw.silu_and_mul is fused and pw.is_compiled


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_budgeted_engine_holds_the_allocator_to_its_measured_limit(tiny_model: Path) -> None:
    """Two blocks, the second a little larger than the first, freed in between: without a cap
    the allocator keeps the first cached and reserves the second beside it (past the limit);
    held, it frees the first. A live allocation past the limit is refused."""
    free, _ = torch.cuda.mem_get_info()
    budget = GpuBudget(min(free // 2, 4 << 30), min(free // 2, 4 << 30))
    engine = Engine(EngineConfig(model=str(tiny_model), device="cuda", budget=budget))
    limit = engine.runner.footprint.allocator_limit_bytes
    peak = engine.runner.footprint.allocator_peak_bytes
    assert limit == peak + allocator_slack(peak)
    dev = engine.runner.device
    try:
        torch.cuda.empty_cache()
        room = limit - torch.cuda.memory_reserved(dev)
        assert room > 64 * MIB
        first = torch.empty(int(room * 0.6), dtype=torch.uint8, device=dev)
        del first
        second = torch.empty(int(room * 0.7), dtype=torch.uint8, device=dev)
        assert torch.cuda.memory_reserved(dev) <= limit
        del second
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(room + 64 * MIB, dtype=torch.uint8, device=dev)
        # The same pattern uncapped goes past the limit: the check above can fail.
        cap_allocator(dev, None)
        torch.cuda.empty_cache()
        first = torch.empty(int(room * 0.6), dtype=torch.uint8, device=dev)
        del first
        second = torch.empty(int(room * 0.7), dtype=torch.uint8, device=dev)
        assert torch.cuda.memory_reserved(dev) > limit
        del second
    finally:
        cap_allocator(dev, None)
        torch.cuda.empty_cache()
