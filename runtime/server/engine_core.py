"""The engine process's loop: apply the server's commands, step the engine, report.

A receiver thread moves commands from the pipe into a queue as they arrive, so the server never
waits on a pipe that the busy engine is not reading; the memory lease's thread (same process)
puts its own commands (:class:`ResizeKv`, :class:`ParkForAgent`) into the same queue, so the
engine is only ever touched between two steps, by this loop.

Warm standby (``standby.py``; on when the server's :class:`StandbyPolicy` is enabled): the
loop owns the runtime's :class:`Residency`, since it does the work and the node agent's lease
asks it to park too. A park (idle timeout, ``ParkEngine``, or the agent through
:meth:`EngineCore.park`) lets running sequences finish until the policy's deadline, then
preempts the rest and gives weights and KV back. Requests that arrive while parking, parked or
waking are held here; once parked they start the wake (a park from the idle timeout is given
up instead). A wake asks the lease for the memory first; if it is not granted in time, or the
device has none, the waiting requests are refused as retryable (the server answers 503 with
Retry-After) and the runtime stays parked. Every report carries the state, which the server
mirrors.
"""

import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Protocol

from berth.runtime.server.engine_messages import (
    STOP,
    AbortRequests,
    AddRequests,
    EngineFailed,
    EngineMessage,
    EngineRequest,
    ParkEngine,
    Rejection,
    StepReport,
    WakeEngine,
    output_row,
)
from berth.runtime.server.standby import (
    ACTIVE,
    PARKING,
    STANDBY,
    WAKING,
    Residency,
    StandbyPolicy,
)

if TYPE_CHECKING:
    from berth.runtime.engine import EngineConfig, EngineStats, RequestOutput, SamplingParams
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
        idle_since = self.idle_since
        idle = state is ACTIVE and idle_since is not None and not self._engine.has_unfinished()
        if idle and self._policy.idle_park_due(now - (idle_since or now)):
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
        granted_s = time.perf_counter() - start
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
        log.info(
            "woke in %.3f s (%.3f s waiting for the node agent's grant)",
            time.perf_counter() - start, granted_s,
        )  # fmt: skip
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
