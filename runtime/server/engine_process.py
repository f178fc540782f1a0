"""The engine's own process: it owns the model, the device, CUDA graphs and the ``step()`` loop.

The HTTP server runs in another process (:mod:`.engine_loop` is its side of the link), so the
event loop's per-token work (SSE chunks, JSON, metrics) and the engine's host work (scheduling,
sampling, detokenization) no longer take turns on one GIL. The two talk over one
``multiprocessing`` pipe (a Unix socket pair) with pickled messages:

- server -> engine: :class:`AddRequests` (one HTTP request's sequences, taken all or none),
  :class:`AbortRequests`, :class:`ParkEngine`, :class:`WakeEngine` and :data:`STOP`;
- engine -> server: :class:`EngineReady` once the model is loaded (or :class:`EngineFailed`),
  then one :class:`StepReport` per iteration of the loop, carrying every request's outputs of
  that step and the engine's stats, so the cost of the link grows with steps, not tokens.

A receiver thread moves commands from the pipe into a queue as they arrive, so the server never
waits on a pipe that the busy engine is not reading. The engine process ignores SIGINT and
SIGTERM (the server decides when it stops: it drains first) and exits on :data:`STOP`, or when
the pipe reports end-of-file because the server has gone, so it never outlives the server.

Warm standby (``standby.py``; on when the server's :class:`StandbyPolicy` is enabled): the
engine process owns the runtime's :class:`Residency`, since it does the work and the node
agent's lease (in this process) asks it to park too. A park (idle timeout, ``ParkEngine``, or
the agent through :meth:`EngineCore.park`) lets running sequences finish until the policy's
deadline, then preempts the rest and gives weights and KV back. Requests that arrive while
parking, parked or waking are held here; once parked they start the wake (a park from the
idle timeout is given up instead). A wake asks the lease for the memory first; if it is not
granted in time, or the device has none, the held requests are refused as retryable (the
server answers 503 with Retry-After) and the runtime stays parked. Every report carries the
state, which the server mirrors.

This module imports neither fastapi nor pydantic: the engine process needs pydantic only for
the node agent's lease (``memory_lease``), loaded when the runtime has a GPU budget.
"""

import dataclasses
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from berth.runtime.engine import RequestOutput
from berth.runtime.server.standby import (
    ACTIVE,
    PARKING,
    STANDBY,
    WAKING,
    Residency,
    StandbyPolicy,
)

if TYPE_CHECKING:
    from berth.runtime.engine import EngineConfig, EngineStats, SamplingParams
    from berth.runtime.server.memory_lease import MemoryLease

log = logging.getLogger(__name__)


class ServableEngine(Protocol):
    """The part of the engine API (``berth.runtime.engine.Engine``) the engine process drives."""

    def add_request(
        self, request_id: str, prompt: str | list[int], params: "SamplingParams"
    ) -> None: ...
    def abort_request(self, request_id: str) -> None: ...
    def step(self) -> "list[RequestOutput]": ...
    def has_unfinished(self) -> bool: ...
    def stats(self) -> "EngineStats": ...
    def park(self) -> int: ...
    def wake(self) -> None: ...
    def unfinished_request_ids(self) -> list[str]: ...

    @property
    def config(self) -> "EngineConfig": ...
    @property
    def max_model_len(self) -> int: ...


# Builds the engine inside the engine process; must be picklable (a module-level function or a
# functools.partial of one), since the 'spawn' start method sends it to a fresh interpreter.
EngineFactory = Callable[[], ServableEngine]


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One sequence to generate: an HTTP request with n choices or a prompt list makes several."""

    request_id: str
    prompt_token_ids: list[int]
    params: "SamplingParams"


# Server -> engine.


@dataclass(frozen=True, slots=True)
class AddRequests:
    """The sequences of one HTTP request: the engine takes all of them or none."""

    requests: list[EngineRequest]


@dataclass(frozen=True, slots=True)
class AbortRequests:
    request_ids: list[str]


@dataclass(frozen=True, slots=True)
class ParkEngine:
    """Park (an operator's ``POST /admin/park``): running sequences finish within the policy's
    deadline, then the weights and KV leave the device. Ignored unless active."""

    reason: str


@dataclass(frozen=True, slots=True)
class WakeEngine:
    """Wake now (``POST /admin/wake``) instead of at the next request. Ignored unless parked or
    parking (a park in progress is given up)."""


STOP = "stop"  # the engine process exits


# Engine -> server.


@dataclass(frozen=True, slots=True)
class EngineReady:
    """The model is loaded; what the server needs to tokenize and validate requests."""

    model_dir: str  # where the tokenizer files are
    max_model_len: int
    weights_bytes: int
    stats: "EngineStats"


@dataclass(frozen=True, slots=True)
class Rejection:
    """The engine refused the sequences of one :class:`AddRequests` (it holds none of them)."""

    request_ids: list[str]
    message: str
    invalid: bool  # the request's fault (the engine's ValueError): a 400, else a 500
    retry: bool = False  # not now, later: the wake got no memory in time (a 503, Retry-After)


# A RequestOutput as a plain tuple of its fields, in declaration order: pickling 64 outputs
# as dataclasses took 170 us in the engine process and 107 us to load in the server; as
# tuples 14 and 19 us (plus 13 us to rebuild them).
OutputRow = tuple[Any, ...]
_output_row = attrgetter(*(f.name for f in dataclasses.fields(RequestOutput)))


def output_row(output: RequestOutput) -> OutputRow:
    row: OutputRow = _output_row(output)
    return row


def output_from_row(row: OutputRow) -> RequestOutput:
    return RequestOutput(*row)


@dataclass(frozen=True, slots=True)
class StepReport:
    """What one iteration of the engine loop did: outputs, refusals and the engine's state."""

    outputs: list[OutputRow]
    rejections: list[Rejection]
    stats: "EngineStats"
    taken: int  # sequences taken from AddRequests so far (accepted or rejected), cumulative
    state: str = ACTIVE.value  # the residency (``StandbyState`` value) after this iteration


@dataclass(frozen=True, slots=True)
class EngineFailed:
    """Loading or stepping the engine raised; the engine process exits after sending this."""

    message: str


EngineMessage = EngineReady | StepReport | EngineFailed


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


@dataclass(eq=False)
class ParkForAgent:
    """From the memory lease (same process): the node agent asked this runtime to park;
    ``held_bytes`` (0 once parked) is set, then ``done``."""

    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    held_bytes: int = 0


@dataclass(eq=False)
class ResizeKv:
    """From the memory lease (same process): fit the KV pool to ``target_bytes`` of device
    memory between two steps; ``held_bytes`` is set, then ``done``, once applied."""

    target_bytes: int
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    held_bytes: int = 0


class EngineCore:
    """The engine process's loop: apply commands, step, report; one report per iteration."""

    def __init__(
        self,
        engine: ServableEngine,
        conn: Connection,
        policy: StandbyPolicy = StandbyPolicy(),  # noqa: B008
        lease: "MemoryLease | None" = None,
    ) -> None:
        self._engine = engine
        self._conn = conn
        self._commands: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._taken = 0
        self.latest_stats: EngineStats | None = None  # read by the memory lease's thread
        self._policy = policy
        self._lease = lease
        self.residency = Residency()
        self.residency.move(ACTIVE)  # loaded
        self._held: list[AddRequests] = []  # arrived while not active: wait for the wake
        self._park_deadline = 0.0  # time.monotonic() by which running sequences are preempted
        self._park_reason = ""
        self._park_waiters: list[ParkForAgent] = []
        # time.monotonic() since when nothing runs or waits (None while busy); the lease reads it.
        self.idle_since: float | None = time.monotonic()

    def park(self, timeout_s: float | None = None) -> int:
        """For the memory lease's thread (the node agent asked): park the engine, wait, and
        return the device bytes still held (0 once parked)."""
        command = ParkForAgent()
        self._commands.put(command)
        if timeout_s is None:
            timeout_s = self._policy.park_deadline_s + 60.0
        if not command.done.wait(timeout_s):
            raise TimeoutError(f"the engine did not park within {timeout_s} s")
        return command.held_bytes

    def resize_kv(self, target_bytes: int, timeout_s: float = 60.0) -> int:
        """Ask the loop to fit the KV pool to ``target_bytes``; wait; return what is held."""
        command = ResizeKv(target_bytes)
        self._commands.put(command)
        if not command.done.wait(timeout_s):
            raise TimeoutError(f"the engine did not resize its KV pool within {timeout_s} s")
        return command.held_bytes

    @property
    def standby_enabled(self) -> bool:
        return self._policy.enabled

    @property
    def parked(self) -> bool:
        """The weights and KV are off the device (standby or waking)."""
        return self.residency.state in (STANDBY, WAKING)

    def _receive(self) -> None:
        """Move commands from the pipe to the queue; end-of-file means the server has gone."""
        try:
            while True:
                self._commands.put(self._conn.recv())
        except (EOFError, OSError):
            self._commands.put(STOP)

    def run(self) -> None:
        threading.Thread(target=self._receive, name="berth-engine-commands", daemon=True).start()
        engine = self._engine
        while True:
            commands = self._next_commands()
            rejections: list[Rejection] = []
            try:
                for command in commands:
                    if command == STOP:
                        self._release_park_waiters()
                        return
                    if isinstance(command, AddRequests):
                        if self.residency.resident:
                            rejection = self._add(command.requests)
                            if rejection is not None:
                                rejections.append(rejection)
                        else:
                            self._held.append(command)
                    elif isinstance(command, AbortRequests):
                        self._abort(command.request_ids)
                    elif isinstance(command, ResizeKv):
                        # Parked: hold nothing more; the wake maps the request back.
                        if self.residency.resident:
                            command.held_bytes = engine.resize_kv_memory(command.target_bytes)  # type: ignore[attr-defined]
                        command.done.set()
                    else:
                        self._on_standby_command(command, rejections)
                self._advance_standby(rejections)
                busy = self.residency.steps and engine.has_unfinished()
                outputs = engine.step() if busy else []
                rows = [output_row(output) for output in outputs]
                stats = self.latest_stats = engine.stats()
                self._note_idle(time.monotonic())
                report = StepReport(
                    rows, rejections, stats, self._taken, self.residency.state.value
                )
            except Exception as exc:
                log.exception("the engine failed; the engine process exits")
                message = (
                    f"The engine failed ({type(exc).__name__}: {exc}); the server must restart."
                )
                self._send(EngineFailed(message))
                return
            if not self._send(report):
                return

    def _next_commands(self) -> list[object]:
        """Busy: what has come. Idle: sleep until a command comes, or until the idle timeout
        is due (then nothing: the loop parks)."""
        commands: list[object] = []
        if not self._has_work():
            timeout = self._idle_park_in(time.monotonic())
            try:
                commands.append(self._commands.get(timeout=timeout))
            except queue.Empty:
                return commands
        try:
            while True:
                commands.append(self._commands.get_nowait())
        except queue.Empty:
            pass
        return commands

    def _has_work(self) -> bool:
        """Something for this iteration to do without a new command."""
        state = self.residency.state
        if state is PARKING:
            return True
        if state is STANDBY:
            return bool(self._held) or self._engine.has_unfinished()
        return self._engine.has_unfinished()

    def _idle_park_in(self, now: float) -> float | None:
        """Seconds until the idle timeout parks an active, idle engine (None: never)."""
        idle_s = self._policy.idle_s
        if not idle_s or self.residency.state is not ACTIVE or self.idle_since is None:
            return None
        return max(0.0, self.idle_since + idle_s - now)

    def _note_idle(self, now: float) -> None:
        busy = self._held or (self.residency.steps and self._engine.has_unfinished())
        if busy:
            self.idle_since = None
        elif self.idle_since is None:
            self.idle_since = now

    # Warm standby.

    def _on_standby_command(self, command: object, rejections: list[Rejection]) -> None:
        state = self.residency.state
        if isinstance(command, ParkEngine):
            if state is ACTIVE:
                self._begin_park(command.reason)
            elif state is PARKING:
                self._park_reason = command.reason  # an operator's park is not given up
        elif isinstance(command, ParkForAgent):
            if state is STANDBY:
                command.held_bytes = 0
                command.done.set()
                return
            if state is ACTIVE:
                self._begin_park("node agent")
            if self.residency.state is not PARKING:  # standby is off: nothing given back
                command.held_bytes = self._held_bytes()
                command.done.set()
                return
            self._park_reason = "node agent"
            self._park_waiters.append(command)
        elif isinstance(command, WakeEngine):
            if state is PARKING:
                self._abandon_park("an operator asked to wake", rejections)
            elif state is STANDBY:
                self._wake(rejections)

    def _begin_park(self, reason: str) -> None:
        if not self._policy.enabled:
            log.warning("asked to park (%s), but standby is off; staying active", reason)
            return
        self.residency.move(PARKING)
        self._park_reason = reason
        self._park_deadline = time.monotonic() + self._policy.park_deadline_s
        log.info("parking (%s)", reason)

    def _advance_standby(self, rejections: list[Rejection]) -> None:
        """Move the residency on: start an idle park, finish or give up a park, wake for the
        requests that wait."""
        state = self.residency.state
        now = time.monotonic()
        if state is ACTIVE:
            due = self._idle_park_in(now)
            if due is not None and due <= 0 and not self._engine.has_unfinished():
                self._begin_park(f"idle for {self._policy.idle_s:g} s")
        if self.residency.state is PARKING:
            if self._held and self._park_reason.startswith("idle"):
                self._abandon_park("a request arrived", rejections)
            elif not self._engine.has_unfinished() or now >= self._park_deadline:
                self._finish_park()
        if self.residency.state is STANDBY and (self._held or self._engine.has_unfinished()):
            self._wake(rejections)  # requests wait: here, or preempted by the park

    def _abandon_park(self, why: str, rejections: list[Rejection]) -> None:
        log.info("parking given up: %s", why)
        self.residency.move(ACTIVE)
        self._release_park_waiters()
        self._admit_held(rejections)

    def _finish_park(self) -> None:
        engine = self._engine
        start = time.perf_counter()
        try:
            preempted = engine.park()
        except Exception:
            log.exception("parking failed; staying active")
            self.residency.move(ACTIVE)
            self._release_park_waiters()
            return
        self.residency.move(STANDBY)
        log.info(
            "parked (%s) in %.3f s; %d sequence(s) preempted", self._park_reason,
            time.perf_counter() - start, preempted,
        )  # fmt: skip
        by_agent = bool(self._park_waiters)
        self._release_park_waiters()
        if self._lease is not None and not by_agent:
            self._lease.parked()

    def _release_park_waiters(self) -> None:
        held = 0 if self.residency.state is STANDBY else self._held_bytes()
        for waiter in self._park_waiters:
            waiter.held_bytes = held
            waiter.done.set()
        self._park_waiters = []

    def _held_bytes(self) -> int:
        stats = self.latest_stats
        return stats.held_bytes if stats is not None else 0

    def _wake(self, rejections: list[Rejection]) -> None:
        """Standby -> waking -> active: get the memory (the lease), map and fill it, then take
        the held requests; or back to standby, refusing them as retryable."""
        self.residency.move(WAKING)
        stats = self._engine.stats()
        self._send(StepReport([], [], stats, self._taken, WAKING.value))  # the server shows it
        start = time.perf_counter()
        why = ""
        granted = self._lease is None or self._lease.wake(self._policy.wake_timeout_s)
        if not granted:
            why = f"the node agent granted no GPU memory within {self._policy.wake_timeout_s:g} s"
        else:
            try:
                self._engine.wake()
            except Exception as exc:
                log.exception("waking failed")
                why = f"the device has no memory for the model ({type(exc).__name__}: {exc})"
                if self._lease is not None:
                    self._lease.parked()
        if why:
            self.residency.move(STANDBY)
            message = f"The model is in standby and could not wake: {why}; retry later."
            log.warning("%s", message)
            for held in self._held:
                ids = [r.request_id for r in held.requests]
                self._taken += len(ids)
                rejections.append(Rejection(ids, message, invalid=False, retry=True))
            self._held = []
            preempted = self._engine.unfinished_request_ids()  # by the park: they waited too
            for request_id in preempted:
                self._engine.abort_request(request_id)
            if preempted:
                rejections.append(Rejection(preempted, message, invalid=False, retry=True))
            return
        self.residency.move(ACTIVE)
        log.info("woke in %.3f s", time.perf_counter() - start)
        self._admit_held(rejections)

    def _admit_held(self, rejections: list[Rejection]) -> None:
        held, self._held = self._held, []
        for command in held:
            rejection = self._add(command.requests)
            if rejection is not None:
                rejections.append(rejection)

    def _abort(self, request_ids: list[str]) -> None:
        """Abort in the engine, and drop any that still wait here for a wake."""
        for request_id in request_ids:
            self._engine.abort_request(request_id)
        if self._held:
            gone = set(request_ids)
            kept: list[AddRequests] = []
            for command in self._held:
                left = [r for r in command.requests if r.request_id not in gone]
                self._taken += len(command.requests) - len(left)
                if left:
                    kept.append(AddRequests(left))
            self._held = kept

    def _add(self, requests: list[EngineRequest]) -> Rejection | None:
        """Add every sequence, or none (aborting the added ones) and say why."""
        self._taken += len(requests)
        added: list[str] = []
        try:
            for request in requests:
                self._engine.add_request(
                    request.request_id, request.prompt_token_ids, request.params
                )
                added.append(request.request_id)
            return None
        except Exception as exc:
            for request_id in added:
                self._engine.abort_request(request_id)
            ids = [r.request_id for r in requests]
            if isinstance(exc, ValueError):  # the engine's verdict on bad input
                return Rejection(ids, str(exc), invalid=True)
            log.exception("the engine failed to take a request")
            return Rejection(ids, f"{type(exc).__name__}: {exc}", invalid=False)

    def _send(self, message: EngineMessage) -> bool:
        """Send ``message``; False when the server has gone."""
        try:
            self._conn.send(message)
        except (BrokenPipeError, ConnectionResetError, EOFError):
            return False
        return True


def admit_to_node_agent(config: "EngineConfig") -> "MemoryLease | None":
    """With a GPU budget, lease it from the node agent before anything is loaded (see
    ``MemoryLease.admit``); None without a budget (local use: nothing to lease)."""
    budget = config.budget
    if budget is None or config.num_kv_blocks is not None or config.kv_cache_bytes is not None:
        return None
    from berth.runtime.server.agent_client import AgentClient
    from berth.runtime.server.memory_lease import LeaseSettings, MemoryLease

    settings = LeaseSettings.from_env()
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
            parked=core.parked,
            idle_s=0.0 if idle_since is None else time.monotonic() - idle_since,
        )

    lease.attach(state, core.resize_kv, core.park if core.standby_enabled else None)
