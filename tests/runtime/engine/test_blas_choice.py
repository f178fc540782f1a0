"""Which BLAS library a decode graph is captured with: the pure pick over measured times, and
the engine setting that names it (the GPU side is in ``test_engine_gpu.py``)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from berth.kernels.skinny_matmul import CANDIDATES, SkinnyConfig
from berth.runtime.engine import EngineConfig, blas_choice
from berth.runtime.engine.blas_choice import DEFAULT, MIN_GAIN, pick, pick_skinny

times_ms = st.dictionaries(
    st.sampled_from(["cublaslt", "other"]),
    st.floats(min_value=0.01, max_value=100.0, allow_nan=False),
    max_size=2,
).flatmap(lambda rest: st.floats(0.01, 100.0).map(lambda t: {DEFAULT: t, **rest}))


@given(times_ms)
def test_another_library_only_when_it_beats_the_default_by_the_margin(
    times: dict[str, float],
) -> None:
    chosen = pick(times)
    assert chosen in times
    fastest = min(times.values())
    if chosen == DEFAULT:
        assert times[DEFAULT] <= fastest * MIN_GAIN
    else:
        assert times[chosen] == fastest
        assert times[DEFAULT] > times[chosen] * MIN_GAIN


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        ({"cublas": 4.273, "cublaslt": 4.043}, "cublaslt"),  # H200, 64 rows: 1.057x
        ({"cublas": 4.653, "cublaslt": 4.677}, "cublas"),  # 128 rows: slower
        ({"cublas": 4.00, "cublaslt": 3.95}, "cublas"),  # 1.013x: within the noise
        ({"cublas": 4.00, "cublaslt": 4.00}, "cublas"),  # a tie keeps the default
        ({"cublas": 4.00}, "cublas"),
    ],
)
def test_measured_picks(times: dict[str, float], expected: str) -> None:
    assert pick(times) == expected


@given(
    st.floats(0.01, 100.0),
    st.dictionaries(st.sampled_from(CANDIDATES), st.floats(0.01, 100.0), max_size=3),
)
def test_the_skinny_kernel_only_where_its_best_config_beats_blas_by_the_margin(
    blas: float, skinny: dict[SkinnyConfig, float]
) -> None:
    chosen = pick_skinny(blas, skinny)
    if chosen is None:
        assert not skinny or blas <= min(skinny.values()) * MIN_GAIN
    else:
        assert skinny[chosen] == min(skinny.values())
        assert blas > skinny[chosen] * MIN_GAIN


def test_skinny_picks_measured_on_the_h200() -> None:
    """QKV at one row on an H200 (skinny-matmul-h200-20261207.json): 16.5 us on cuBLAS, 15.0 on
    the default config; gate/up 55.7 against 56.3: stays on BLAS."""
    default, short_k = CANDIDATES[0], CANDIDATES[1]
    assert pick_skinny(16.5, {default: 15.0, short_k: 15.3}) == default
    assert pick_skinny(55.7, {default: 56.3}) is None
    assert pick_skinny(10.0, {default: 9.9}) is None  # 1 %: within the noise


def test_a_time_for_the_default_is_required() -> None:
    with pytest.raises(ValueError, match="default library 'cublas'"):
        pick({"cublaslt": 1.0})


@pytest.mark.parametrize("value", ["measured", *blas_choice.LIBRARIES])
def test_the_engine_setting_takes_measured_and_each_library(value: str) -> None:
    EngineConfig(model="m", decode_blas=value).validate()


@pytest.mark.parametrize("value", ["cuBLAS", "auto", ""])
def test_the_engine_setting_names_itself_when_wrong(value: str) -> None:
    with pytest.raises(ValueError, match="decode_blas must be measured, cublas or cublaslt"):
        EngineConfig(model="m", decode_blas=value).validate()


def test_berth_serve_refuses_an_unknown_library_naming_the_flag() -> None:
    from click.testing import CliRunner

    from berth.runtime.server.cli import serve

    result = CliRunner().invoke(serve, ["--model", "tiny", "--decode-blas", "mkl"])
    assert result.exit_code == 2 and "--decode-blas" in result.output, result.output
