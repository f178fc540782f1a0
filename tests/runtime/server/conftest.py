"""Fixtures: the tiny model, the engine's configuration, and real uvicorn servers on free
loopback ports, each with a real engine process of its own."""

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_harness import MAX_NUM_SEQS, NUM_KV_BLOCKS, RunningServer, running_server

from berth.runtime.engine import EngineConfig
from berth.runtime.engine.testmodels import make_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model("tiny", tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def engine_config(tiny_model: Path) -> EngineConfig:
    return EngineConfig(
        model=str(tiny_model), device="cpu", max_num_seqs=MAX_NUM_SEQS, num_kv_blocks=NUM_KV_BLOCKS
    )


@pytest.fixture(scope="module")
def served(engine_config: EngineConfig) -> Iterator[RunningServer]:
    """One server per test module with default settings."""
    with running_server(engine_config) as server:
        yield server


@pytest.fixture(autouse=True)
def _collectable_heap() -> Iterator[None]:
    """A server run in this process froze its heap out of the collector's full passes (as it
    does in production); give the objects back so the test session's cycles are collected."""
    yield
    if gc.get_freeze_count():
        gc.unfreeze()
