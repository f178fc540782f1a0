"""The pod's GPU budget: read from env and the annotations file, refused when bad, fitted to."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from berth import wire
from berth.runtime.engine import Engine, EngineConfig
from berth.runtime.engine.budget import (
    BudgetError,
    BudgetTooSmall,
    GpuBudget,
    budget_from_flags,
    parse_annotations,
    plan_kv_pool,
    read_budget,
)

GIB = 1 << 30


def _annotations(tmp_path: Path, **values: str) -> Path:
    lines = [f'{k}="{v}"' for k, v in values.items()]
    (tmp_path / "annotations").write_text("\n".join(['other/key="x"', *lines]) + "\n")
    return tmp_path


def test_no_budget_variables_and_no_pod_file_means_local_use(tmp_path: Path) -> None:
    assert read_budget({}, tmp_path) is None


def test_env_budget_is_read_and_the_limit_defaults_to_the_request(tmp_path: Path) -> None:
    env = {wire.ENV_GPU_MEMORY_REQUEST: str(8 * GIB), wire.ENV_GPU_UUID: "GPU-abc"}
    assert read_budget(env, tmp_path) == GpuBudget(8 * GIB, 8 * GIB, "GPU-abc")


def test_annotations_file_wins_over_the_env(tmp_path: Path) -> None:
    env = {wire.ENV_GPU_MEMORY_REQUEST: "100", wire.ENV_GPU_MEMORY_LIMIT: "100"}
    pod = _annotations(
        tmp_path,
        **{wire.POD_GPU_MEMORY_REQUEST: "200", wire.POD_GPU_MEMORY_LIMIT: "300"},
    )
    assert read_budget(env, pod) == GpuBudget(200, 300, None)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({wire.ENV_GPU_MEMORY_REQUEST: ""}, wire.ENV_GPU_MEMORY_REQUEST),
        ({wire.ENV_GPU_UUID: "GPU-abc"}, wire.ENV_GPU_MEMORY_REQUEST),
        ({wire.ENV_GPU_MEMORY_REQUEST: "8Gi"}, wire.ENV_GPU_MEMORY_REQUEST),
        ({wire.ENV_GPU_MEMORY_REQUEST: "0"}, wire.ENV_GPU_MEMORY_REQUEST),
        ({wire.ENV_GPU_MEMORY_REQUEST: "10", wire.ENV_GPU_MEMORY_LIMIT: "x"}, "LIMIT"),
        ({wire.ENV_GPU_MEMORY_REQUEST: "10", wire.ENV_GPU_MEMORY_LIMIT: "5"}, "LIMIT"),
    ],
)
def test_a_missing_or_malformed_budget_under_the_operator_names_the_variable(
    tmp_path: Path, env: dict[str, str], named: str
) -> None:
    with pytest.raises(BudgetError, match=named):
        read_budget(env, tmp_path)


def test_a_malformed_annotation_names_the_annotation_and_its_file(tmp_path: Path) -> None:
    pod = _annotations(tmp_path, **{wire.POD_GPU_MEMORY_REQUEST: "lots"})
    with pytest.raises(BudgetError, match=f"{wire.POD_GPU_MEMORY_REQUEST}.*annotations"):
        read_budget({}, pod)


def test_a_pod_file_without_a_request_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BudgetError, match=wire.ENV_GPU_MEMORY_REQUEST):
        read_budget({}, _annotations(tmp_path))


def test_go_quoted_annotation_values_are_unquoted() -> None:
    assert parse_annotations('a="x\\"y"\nb="1"\nnot a line') == {"a": 'x"y', "b": "1"}


def test_flags_make_a_budget_and_a_limit_alone_is_refused() -> None:
    assert budget_from_flags(None, None) is None
    assert budget_from_flags(10, None) == GpuBudget(10, 10)
    with pytest.raises(BudgetError, match="--gpu-memory-request"):
        budget_from_flags(None, 10)


@given(
    request=st.integers(1, 1 << 40),
    extra=st.integers(0, 1 << 40),
    weights=st.integers(0, 1 << 38),
    workspace=st.integers(0, 1 << 36),
    chunk=st.integers(1, 1 << 30),
)
def test_the_plan_never_exceeds_the_request_or_the_limit(
    request: int, extra: int, weights: int, workspace: int, chunk: int
) -> None:
    budget = GpuBudget(request, request + extra)
    try:
        plan = plan_kv_pool(budget, weights, workspace, chunk)
    except BudgetTooSmall:
        assert weights + workspace + chunk > request
        return
    assert plan.request_chunks >= 1
    assert plan.held_bytes(plan.request_chunks) <= request
    assert plan.held_bytes(plan.request_chunks + 1) > request
    assert plan.held_bytes(plan.limit_chunks) <= request + extra
    assert plan.chunks_within(0) == plan.request_chunks  # never below the request
    assert plan.chunks_within(1 << 62) == plan.limit_chunks


def test_a_request_too_small_for_the_weights_is_refused_with_the_numbers() -> None:
    with pytest.raises(BudgetTooSmall, match=r"1000 bytes.*weights 900 bytes.*workspace 50"):
        plan_kv_pool(GpuBudget(1000, 2000), 900, 50, 100)


def test_engine_sizes_its_kv_pool_from_the_budget(tiny_model: Path) -> None:
    probe = Engine(EngineConfig(model=str(tiny_model), device="cpu", dtype="float32"))
    weights, chunk = probe.runner.weights_bytes, probe.runner.layout.chunk_bytes
    budget = GpuBudget(weights + 5 * chunk + chunk // 2, weights + 12 * chunk)
    engine = Engine(
        EngineConfig(model=str(tiny_model), device="cpu", dtype="float32", budget=budget)
    )
    layout = engine.runner.layout
    assert engine.runner.arena.num_chunks == 5
    assert engine.pool.num_blocks == 5 * layout.chunk_blocks
    assert engine.runner.arena.max_chunks == 12
    assert engine.stats().held_bytes == weights + 5 * chunk <= budget.request_bytes


def test_engine_refuses_a_budget_that_cannot_hold_its_weights(tiny_model: Path) -> None:
    config = EngineConfig(
        model=str(tiny_model), device="cpu", dtype="float32", budget=GpuBudget(4096, 8192)
    )
    with pytest.raises(BudgetTooSmall, match="cannot hold this model: weights"):
        Engine(config)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({wire.ENV_GPU_MEMORY_REQUEST: ""}, wire.ENV_GPU_MEMORY_REQUEST),
        ({wire.ENV_GPU_MEMORY_REQUEST: "20Gi"}, wire.ENV_GPU_MEMORY_REQUEST),
    ],
)
def test_berth_serve_refuses_to_start_with_a_bad_budget_naming_the_variable(
    env: dict[str, str], named: str
) -> None:
    from click.testing import CliRunner

    from berth.runtime.server.cli import serve

    result = CliRunner().invoke(serve, ["--model", "tiny"], env=env)
    assert result.exit_code == 2 and named in result.output, result.output


def test_a_logical_gpu_budget_on_the_cpu_backs_no_more_than_the_batch_can_use(
    tiny_model: Path,
) -> None:
    """A simulated 40 GiB share on the CPU (the real-node e2e) must not allocate 40 GiB."""
    config = EngineConfig(
        model=str(tiny_model),
        device="cpu",
        dtype="float32",
        max_num_seqs=8,
        max_model_len=256,
        budget=GpuBudget(40 * GIB, 40 * GIB),
    )
    engine = Engine(config)
    arena = engine.runner.arena
    assert arena.max_blocks == 8 * 256 // 16  # the batch at full length
    assert engine.pool.num_blocks == arena.num_blocks == arena.max_blocks
    assert engine.runner.plan is not None and engine.runner.plan.request_chunks > arena.max_chunks
    assert engine.stats().held_bytes < 64 << 20
