"""Fixtures: the tiny model, one real engine for the session, and real uvicorn servers on
free loopback ports around it (one at a time, since one engine has one driver)."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from server_harness import MAX_NUM_SEQS, RunningServer, running_server

from berth.runtime.engine import Engine, EngineConfig
from berth.runtime.engine.testmodels import make_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model("tiny", tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def engine(tiny_model: Path) -> Engine:
    config = EngineConfig(
        model=str(tiny_model), device="cpu", max_num_seqs=MAX_NUM_SEQS, num_kv_blocks=256
    )
    return Engine(config)


@pytest.fixture(scope="module")
def served(engine: Engine) -> Iterator[RunningServer]:
    """One server per test module with default settings."""
    with running_server(engine) as server:
        yield server
