"""The start-up heap is frozen out of the collector's full passes once the model has loaded
(``benchmarks/gc_pauses.py`` measures what that saves under load)."""

import gc

from server_harness import running_server

from berth.runtime.engine import EngineConfig
from berth.runtime.server.heap import freeze_startup_heap


def test_freezing_moves_what_is_alive_into_the_permanent_generation() -> None:
    gc.unfreeze()
    alive = [[] for _ in range(1000)]  # containers the collector tracks
    frozen = freeze_startup_heap("test")
    assert frozen >= len(alive)
    assert gc.get_freeze_count() == frozen
    gc.unfreeze()
    assert gc.get_freeze_count() == 0


def test_the_server_freezes_its_heap_once_the_model_has_loaded(
    engine_config: EngineConfig,
) -> None:
    gc.unfreeze()
    with running_server(engine_config) as server:  # returns once the model is served
        assert server.model_server.model is not None
        assert gc.get_freeze_count() > 0
