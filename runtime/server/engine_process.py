"""The engine's own process: it owns the model, the device, CUDA graphs and the ``step()`` loop.

The HTTP server runs in another process (:mod:`.engine_loop` is its side of the link), so the
event loop's per-token work (SSE chunks, JSON, metrics) and the engine's host work (scheduling,
sampling, detokenization) no longer take turns on one GIL. The two talk over one
``multiprocessing`` pipe (a Unix socket pair) with the pickled messages of
:mod:`.engine_messages`; :class:`~.engine_core.EngineCore` is the loop that serves them.

The engine process ignores SIGINT and SIGTERM (the server decides when it stops: it drains
first) and exits on ``STOP``, or when the pipe reports end-of-file because the server has gone,
so it never outlives the server.

This module imports neither fastapi nor pydantic: the engine process needs pydantic only for
the node agent's lease (``memory_lease``), loaded when the runtime has a GPU budget.
"""

import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

from berth.runtime.server import heap
from berth.runtime.server.engine_core import EngineCore, ServableEngine
from berth.runtime.server.engine_messages import EngineFailed, EngineReady
from berth.runtime.server.standby import StandbyPolicy

if TYPE_CHECKING:
    from berth.runtime.engine import EngineConfig
    from berth.runtime.server.memory_lease import MemoryLease

log = logging.getLogger(__name__)

# Builds the engine inside the engine process; must be picklable (a module-level function or a
# functools.partial of one), since the 'spawn' start method sends it to a fresh interpreter.
EngineFactory = Callable[[], ServableEngine]


def share_cpu_with_event_loop(device: str) -> None:
    """On the CPU, leave one core to the server process: torch's OpenMP workers spin-wait after
    every op, and with all cores theirs the HTTP side starves (measured on 2 cores: 4 streams
    ran at 60 tokens/s instead of 800)."""
    import torch

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))


def load_engine(config: "EngineConfig", make_tiny_seed: int | None = None) -> ServableEngine:
    """The engine factory of ``berth serve``: make the random ``tiny`` model first if asked to
    (``make_tiny_seed``), or import a named real model (``smollm2``: converted once, then read
    from the cache), lease the GPU budget from the node agent, then load the engine from
    ``config.model``."""
    from berth.runtime.engine import Engine
    from berth.runtime.engine.gguf_import import GGUF_MODELS, import_model

    share_cpu_with_event_loop(config.device)
    model_dir = Path(config.model)
    if make_tiny_seed is not None and not (model_dir / "config.json").exists():
        from berth.runtime.engine.testmodels import make_model

        make_model(model_dir.name, model_dir, seed=make_tiny_seed)
    elif config.model in GGUF_MODELS:
        config = dataclasses.replace(config, model=str(import_model(config.model, say=log.info)))
    lease = admit_to_node_agent(config)  # before the weights take any GPU memory
    try:
        engine = Engine(config)
    except BaseException:
        if lease is not None:
            lease.end()
        raise
    engine.memory_lease = lease  # type: ignore[attr-defined]  # the engine loop picks it up
    return engine


def weights_bytes(engine: ServableEngine) -> int:
    """Bytes of the engine's weights: parameters and buffers of its model, where it exposes one."""
    model = getattr(getattr(engine, "runner", None), "model", None)
    if model is None or not hasattr(model, "parameters"):
        return 0
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def run_engine_process(
    conn: Connection,
    factory: EngineFactory,
    log_level: str,
    policy: StandbyPolicy = StandbyPolicy(),  # noqa: B008  (frozen: one shared default is fine)
) -> None:
    """The engine process's entry point: load the engine, report, then serve commands."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s[engine]: %(message)s"
    )
    try:
        engine = factory()
        ready = EngineReady(
            str(engine.config.model), engine.max_model_len, weights_bytes(engine), engine.stats()
        )
    except Exception as exc:
        log.exception("loading the model failed")
        conn.send(EngineFailed(f"loading the model failed: {type(exc).__name__}: {exc}"))
        return
    heap.freeze_startup_heap("engine process")  # the model, torch and Triton stay for good
    conn.send(ready)
    lease = getattr(engine, "memory_lease", None)
    core = EngineCore(engine, conn, policy, lease)
    core.latest_stats = ready.stats
    if lease is not None:
        attach_memory_lease(lease, engine, core)
    core.run()
    if lease is not None:
        lease.end()  # the node agent gets the memory back at once
    # Leave without the interpreter's teardown: with the command thread blocked in recv and
    # torch's thread pools alive, finalization has aborted the process (SIGABRT) in tests.
    logging.shutdown()
    os._exit(0)


def admit_to_node_agent(config: "EngineConfig") -> "MemoryLease | None":
    """With a GPU budget, lease it from the node agent before anything is loaded (see
    ``MemoryLease.admit``); None without a budget (local use: nothing to lease)."""
    budget = config.budget
    if budget is None or config.num_kv_blocks is not None or config.kv_cache_bytes is not None:
        return None
    from berth.runtime.server.agent_client import AgentClient
    from berth.runtime.server.memory_lease import LeaseSettings, MemoryLease

    # The engine's own setting decides (``--standby-idle-seconds`` may have set it, not the env).
    settings = dataclasses.replace(LeaseSettings.from_env(), can_park=config.standby)
    lease = MemoryLease(
        AgentClient(settings.socket_path), settings, budget, budget.gpu_uuid or _gpu_uuid(config)
    )
    log.info("leasing GPU memory from the node agent at %s as %s", settings.socket_path,
             settings.tenant)  # fmt: skip
    lease.admit()
    lease.start()  # heartbeats while the weights load
    return lease


def _gpu_uuid(config: "EngineConfig") -> str:
    """The device's UUID when the budget names none (a local ``berth serve`` on a GPU)."""

    from berth.runtime.engine.memory_profile import device_uuid
    from berth.runtime.engine.model_runner import resolve_device

    return device_uuid(resolve_device(config.device)) or "GPU-0"


def attach_memory_lease(lease: "MemoryLease", engine: ServableEngine, core: EngineCore) -> None:
    """The engine is loaded: the lease reads its state from the loop's latest stats and
    resizes the pool through the loop."""
    from berth.runtime.server.memory_lease import MemoryState

    runner = getattr(engine, "runner")  # noqa: B009  (the engine, not the protocol, has it)
    plan, arena = runner.plan, runner.arena

    def state() -> MemoryState | None:
        stats = core.latest_stats  # the loop's latest snapshot: never touch the engine here
        if stats is None:
            return None
        idle_since = core.idle_since
        return MemoryState(
            plan,
            arena.num_chunks,
            arena.layout.chunk_blocks,
            stats.num_total_blocks - stats.num_free_blocks,
            stats.num_waiting,
            stats.num_running + stats.num_waiting,
            blocked_blocks=stats.blocked_blocks,
            parked=core.parked,
            idle_s=0.0 if idle_since is None else time.monotonic() - idle_since,
        )

    lease.attach(state, core.resize_kv, core.park if core.standby_enabled else None)
