"""The runtime's side of the node agent's memory lease: register, heartbeat, burst, obey reclaims.

Runs in the engine process (the process that owns the KV pool). Before the engine loads,
``admit`` registers holding nothing and waits until the agent grants the request (it may first
reclaim another tenant's burst). Then, as a thread, each cycle it reads
the engine's latest :class:`MemoryState`, works out what it would like to hold
(:func:`desired_bytes`, pure), and tells the agent in a heartbeat; the reply says what it may
hold. It grows only up to a grant, shrinks when the reply carries a reclaim (then acknowledges
with ``release``) or when its own demand falls, and never goes below the budget's request,
which the GPU scheduler reserved for it. Resizes are not done here: ``resize`` hands a target to
the engine loop, which applies it between two steps (preempting the sequences in the region
given back) and returns what the engine holds afterwards.

Warm standby (``can_park``, when ``BERTH_STANDBY_IDLE_SECONDS`` is set): the runtime parks
(gives back weights and KV, keeping the weights in host RAM) on its own, then calls
:meth:`MemoryLease.parked`, or because the agent asked (a reclaim with ``park``: the lease calls
the engine's ``park`` on a thread of its own, heartbeating meanwhile, and releases what it gave
back). While parked it reports holding and wanting nothing. To wake, the engine calls
:meth:`MemoryLease.wake`, which asks for the request again and waits for the grant before the
engine maps anything.

Orders: a second thread long-polls the agent (``orders``) and makes the lease cycle at once when
the agent issues a reclaim or a park order, instead of at the next heartbeat.

Agent unreachable (no socket yet, restarted, stalled): keep serving within what is held, never
grow, try again next cycle. ``404 unknown_tenant`` (the agent restarted, or our lease lapsed):
register again with what we hold. ``409 instance_mismatch``: another
instance owns this tenant; give back every burst and stop talking to the agent.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from berth import agent_protocol as proto
from berth import wire
from berth.runtime.engine.budget import GpuBudget, KvPlan
from berth.runtime.server.agent_client import AgentClient, AgentError

log = logging.getLogger(__name__)

GROW_AT = 0.85  # KV usage at or above which the runtime asks for more (toward its limit)
RELEASE_AT = 0.30  # KV usage at or below which it gives back burst chunks it does not use
TARGET_USAGE = 0.60  # the usage a resize aims at, growing or shrinking: well inside both bands
RETRY_S = proto.REGISTER_RETRY_S  # between attempts while the agent is unreachable
WAKE_POLL_S = 0.025  # between heartbeats while a wake waits for its grant (well under 1 s)
ORDERS_WAIT_S = 10.0  # one orders long poll (the agent answers at once when it issues one)


@dataclass(frozen=True)
class MemoryState:
    """What the engine loop publishes after each step for the lease thread to read."""

    plan: KvPlan
    num_chunks: int  # backed now
    chunk_blocks: int
    used_blocks: int  # held by live sequences
    num_waiting: int
    in_flight: int  # running + waiting sequences
    blocked_blocks: int = 0  # blocks a request held back for memory needs (0: none is)
    parked: bool = False  # weights and KV given back (warm standby): it holds nothing
    idle_s: float = 0.0  # seconds since the last request ended; 0 while any is in flight

    @property
    def held_bytes(self) -> int:
        return 0 if self.parked else self.plan.held_bytes(self.num_chunks)


def desired_bytes(state: MemoryState) -> int:
    """What the runtime would like to hold: nothing while parked; under memory pressure (usage at
    ``GROW_AT`` or above, or a waiting request that the free blocks cannot hold) enough chunks to
    run what it holds and that request at ``TARGET_USAGE``, at least one more, within its limit;
    once usage falls to ``RELEASE_AT`` with nothing waiting, its burst back down to
    ``TARGET_USAGE`` (never below the request); else what it holds.

    Both resizes land at ``TARGET_USAGE``, between the two bands, so the next cycle at the same
    load holds still. (Asking for the whole limit whenever a request waited made a runtime on the
    H200 map tens of GiB for a prompt that only waited for the step's token budget, then give
    most of it back a cycle later, over and over.)"""
    if state.parked:
        return 0
    plan = state.plan
    total = state.num_chunks * state.chunk_blocks
    usage = state.used_blocks / total if total else 1.0
    at_target = math.ceil(state.used_blocks / (TARGET_USAGE * state.chunk_blocks))
    if usage >= GROW_AT or state.blocked_blocks:
        # A request larger than the free blocks waits at any usage (on a pool smaller than
        # one prompt it would wait forever at 0 %): its blocks count as used.
        demand = state.used_blocks + state.blocked_blocks
        grown = max(math.ceil(demand / (TARGET_USAGE * state.chunk_blocks)), state.num_chunks + 1)
        return plan.held_bytes(min(grown, plan.limit_chunks))
    if usage <= RELEASE_AT and not state.num_waiting and state.num_chunks > plan.request_chunks:
        return plan.held_bytes(max(plan.request_chunks, min(at_target, state.num_chunks)))
    return state.held_bytes


@dataclass(frozen=True)
class LeaseSettings:
    """Where the agent is and who this runtime is; read once from the environment."""

    socket_path: str
    tenant: str
    instance: str
    can_park: bool = False  # warm standby is on: the agent may ask this runtime to park

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LeaseSettings:
        env = os.environ if env is None else env
        path = env.get(proto.ENV_SOCKET) or proto.DEFAULT_SOCKET
        namespace, name = env.get(wire.ENV_POD_NAMESPACE), env.get(wire.ENV_POD_NAME)
        if namespace and name:
            tenant = f"{namespace}/{name}"
        else:  # local berth serve: any unique id
            host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:200] or "local"
            tenant = f"{host}-{os.getpid()}"
        can_park = bool(env.get(wire.ENV_STANDBY_IDLE_SECONDS, "").strip())
        return cls(path, tenant, uuid.uuid4().hex[:16], can_park)


class MemoryLease:
    """One runtime's lease; ``cycle`` is one heartbeat (tests drive it directly).

    Thread-safe where it must be: the lease thread cycles, while the engine may call
    :meth:`parked` and :meth:`wake`. Each exchange with the agent (what is held and wanted,
    the call, the reply) runs under one lock; the engine's callables never do, so a park or a
    resize may take its time without blocking a wake."""

    def __init__(
        self, client: AgentClient, settings: LeaseSettings, budget: GpuBudget, gpu_uuid: str
    ) -> None:
        self.client = client
        self.settings = settings
        self.budget = budget
        self.gpu_uuid = gpu_uuid
        # Until ``attach``: the engine is not loaded yet, holds nothing and wants its request.
        self._state: Callable[[], MemoryState | None] = lambda: None
        self._resize: Callable[[int], int] = lambda target: 0
        self._park: Callable[[], int] | None = None
        self.registered = False
        self.stopped = False
        self.epoch: str | None = None
        self.interval_s = RETRY_S
        self.granted_bytes = budget.request_bytes  # before any reply: the scheduler's request
        self.num_reclaims = 0
        self.num_parks = 0  # parks the agent asked for
        # Standby as the agent is told it: "parked" (hold 0, want 0), "waking" (hold 0, want
        # the request), or None (resident: what the engine's state says).
        self._standby: str | None = None
        self._parking = False  # the engine is parking at the agent's request
        self._wakes = 0  # wakes begun: a park that ends after a wake began says nothing
        self._woken = False  # granted a wake; until the engine's state shows it resident
        self._warned = False
        self._refused: str | None = None  # the code of the agent's last refusal
        self._loading_held = 0  # what to report before ``attach``
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._kick = threading.Event()  # an order came: cycle now

    def attach(
        self,
        state: Callable[[], MemoryState | None],
        resize: Callable[[int], int],
        park: Callable[[], int] | None = None,
    ) -> None:
        """The engine is loaded: read its state from ``state``, resize its pool by ``resize``,
        and (warm standby) park it by ``park``, which blocks until the engine has given its
        memory back and returns the bytes it still holds."""
        self._state, self._resize, self._park = state, resize, park

    @property
    def standby(self) -> bool:
        """Parked, or waking and not yet granted its request."""
        return self._standby is not None

    def admit(self) -> None:
        """Before the engine loads anything: register holding nothing, and wait until the grant
        covers the request (the agent may first have to reclaim another tenant's burst). An
        unreachable agent, or one that refuses the registration, is not waited for: the GPU
        scheduler reserved the request, so the runtime starts within it and retries later.
        Except in warm standby: the scheduler overcommits standby tenants' memory (only the
        resident ones must fit), so a refusal because the GPU is full is not a reservation
        broken but a turn to wait for: until another tenant idles and the agent parks it.
        Loading anyway would take memory that a resident tenant holds."""
        waited, said = 0.0, 0.0
        while True:
            delay = self.cycle_safely()
            if self.registered and self.granted_bytes >= self.budget.request_bytes:
                break
            if not self.registered and not self._waits_for_room():
                break
            if waited - said >= 10.0 or said == 0.0:
                log.info(
                    "waiting for the node agent to %s the request (%d of %d MiB granted)",
                    "grant" if self.registered else "admit (another tenant must park first)",
                    self.granted_bytes >> 20 if self.registered else 0,
                    self.budget.request_bytes >> 20,
                )  # fmt: skip
                said = max(waited, 1e-9)
            time.sleep(delay)
            waited += delay
        self._loading_held = self.budget.request_bytes

    def _waits_for_room(self) -> bool:
        """Refused admission: wait for a turn (standby, GPU full), or start within the request."""
        return self.settings.can_park and self._refused == "request_does_not_fit"

    def cycle(self) -> float:
        """Register or heartbeat once, act on the reply; returns seconds until the next cycle."""
        if self.stopped:
            return self.interval_s
        with self._lock:
            state = self._state()
            held, want = self._report(state)
            try:
                reply = self._exchange(held, want, state)
            except AgentError as e:
                error: AgentError | None = e
            else:
                error = None
            standby = self._standby is not None or (state is not None and state.parked)
        if error is not None:  # outside the lock: it may resize the engine
            return self._failed(error)
        if state is not None:
            self._apply(reply, held, want, standby)
        return self.interval_s

    def _report(self, state: MemoryState | None) -> tuple[int, int]:
        """What to tell the agent the runtime holds and wants (called under the lock)."""
        request = self.budget.request_bytes
        if self._standby == "parked":  # the engine said so: trust it over a stale state
            return 0, 0
        if state is None:  # loading: up to the request once admitted (its grant covers it)
            return self._loading_held, request
        if self._standby == "waking":
            return state.held_bytes, max(request, state.held_bytes)
        if self._parking:  # on its way to holding nothing, at the agent's request
            return state.held_bytes, 0
        if state.parked:  # woken (the engine maps its request back now), else parked
            return 0, (request if self._woken else 0)
        self._woken = False
        return state.held_bytes, desired_bytes(state)

    def _exchange(self, held: int, want: int, state: MemoryState | None) -> proto.Lease:
        """Register, or heartbeat; records the grant (called under the lock)."""
        if not self.registered:
            reply: proto.Lease = self._register(held, want)
        else:
            s = self.settings
            reply = self.client.heartbeat(
                s.tenant, proto.Heartbeat(
                    instance=s.instance, held_bytes=held, want_bytes=want,
                    in_flight=state.in_flight if state else 0,
                    idle_s=max(0.0, state.idle_s) if state else 0.0,
                )
            )  # fmt: skip
        self._warned, self._refused = False, None
        self.granted_bytes = reply.granted_bytes
        return reply

    def _register(self, held: int, want: int) -> proto.Lease:
        s, b = self.settings, self.budget
        reply = self.client.register(
            proto.Register(
                tenant=s.tenant, instance=s.instance, gpu_uuid=self.gpu_uuid,
                request_bytes=b.request_bytes, limit_bytes=b.limit_bytes,
                held_bytes=min(held, b.limit_bytes), want_bytes=min(want, b.limit_bytes),
                pid=os.getpid(), can_park=s.can_park,
            )
        )  # fmt: skip
        self.registered, self.epoch = True, reply.agent_epoch
        self.interval_s = reply.heartbeat_interval_s
        log.info(
            "registered with the node agent as %s on %s: granted %d MiB (%s)",
            s.tenant, self.gpu_uuid, reply.granted_bytes >> 20, reply.state,
        )  # fmt: skip
        return reply

    def _failed(self, e: AgentError) -> float:
        self._refused = e.code
        if e.code == "unknown_tenant":
            log.warning("the node agent no longer knows this tenant; registering again")
            self.registered = False
            return 0.0
        if e.code == "held_exceeds_free":  # after an agent restart: come down, then retry
            log.warning(
                "the node agent cannot grant what is held (%s); shrinking to the request", e
            )
            self._resize(self.budget.request_bytes)
            return RETRY_S
        if e.code == "instance_mismatch":
            log.error("another instance holds this tenant's lease: giving back bursts (%s)", e)
            if self._standby is None:
                self._resize(self.budget.request_bytes)
            self.stopped = True
            return self.interval_s
        # Unreachable, or refused (409 does not fit, 503 recovering): serve within what is held,
        # or (standby, not admitted yet) wait for a turn.
        then = "waiting for a turn" if self._waits_for_room() else "serving within the request"
        (log.warning if not self._warned else log.debug)("%s; %s", e, then)
        self._warned = True
        return RETRY_S if e.unreachable or not self.registered else self.interval_s

    def _apply(self, reply: proto.Lease, held: int, want: int, standby: bool) -> None:
        """Park when asked; else (resident) grow only within the grant, shrink on a reclaim or
        when demand falls, and release."""
        self.granted_bytes = reply.granted_bytes
        if reply.reclaim is not None and reply.reclaim.park:
            self._park_for_agent()
            return
        if standby or self._parking:  # nothing to resize: parked, or parking
            return
        floor = self.budget.request_bytes
        if reply.reclaim is not None:
            self.num_reclaims += 1
            target = max(reply.reclaim.target_bytes, floor)
            self._shrink(target, min(want, target))
        elif want < held:
            self._shrink(max(want, floor), max(want, floor))
        elif want > held and reply.granted_bytes > held:
            self._resize(min(want, reply.granted_bytes))

    def _park_for_agent(self) -> None:
        """The agent asked this runtime to park: park the engine on a thread of its own (it may
        wait for running requests to finish, and heartbeats must go on meanwhile, or the lease
        would lapse while the memory is still held), then release what it holds."""
        if self._standby == "parked" or self._parking:
            return  # parked already, or on its way: the release, or the next heartbeat, says so
        if self._park is None:
            log.warning("the node agent asked this runtime to park, but it cannot (no standby)")
            return
        self.num_parks += 1
        self._parking = True
        log.info("the node agent asked this runtime to park: giving its GPU memory back")
        wakes = self._wakes
        threading.Thread(
            target=self._park_then_release,
            args=(self._park, wakes),
            name="berth-park",
            daemon=True,
        ).start()

    def _park_then_release(self, park: Callable[[], int], wakes: int) -> None:
        try:
            held: int | None = park()  # blocks until the engine is parked; outside the lock
        except Exception:
            log.exception("parking for the node agent failed")
            held = None
        with self._lock:
            self._parking = False
            if held is None or self._wakes != wakes:
                return  # failed (the heartbeats report what is held), or already waking again
            if held == 0:
                self._standby = "parked"
            state = self._state()
            want = 0 if held == 0 else (desired_bytes(state) if state else held)
            self._send_release(held, want)

    def _shrink(self, target: int, want: int) -> None:
        """Come down to ``target`` and tell the agent, with what we want from now on (so a
        reclaimed or idle burst is not granted straight back)."""
        held = self._resize(target)
        with self._lock:
            self._send_release(held, want)

    def _send_release(self, held: int, want: int) -> None:
        """``release`` (called under the lock); a failure is reported by the next heartbeat."""
        if not self.registered or self.stopped:
            return
        s = self.settings
        try:
            reply = self.client.release(
                s.tenant, proto.Release(instance=s.instance, held_bytes=held, want_bytes=want)
            )
            self.granted_bytes = reply.granted_bytes
        except AgentError as e:  # the next heartbeat reports what is held
            log.warning("release after shrinking to %d MiB failed: %s", held >> 20, e)

    def parked(self) -> None:
        """The runtime parked on its own (idle, or an operator's request): from now on it holds
        and wants nothing, and the agent hears so at once."""
        with self._lock:
            self._standby = "parked"
            self._send_release(0, 0)

    def wake(self, timeout_s: float) -> bool:
        """Ask the agent for the request back and wait until it is granted (True: the engine may
        map it now) or ``timeout_s`` passes (False: still parked; the agent is told the runtime
        wants nothing again, so it is not granted memory it will not map). Without an agent to
        answer (unreachable, or another instance holds the lease) the wake fails: memory given
        back may have gone to another tenant since."""
        deadline = time.monotonic() + timeout_s
        request = self.budget.request_bytes
        with self._lock:
            self._standby = "waking"
            self._wakes += 1
        log.info("waking: asking the node agent for %d MiB", request >> 20)
        while not self.stopped:
            with self._lock:
                try:
                    reply = self._exchange(0, request, self._state())
                except AgentError as e:
                    if e.code == "unknown_tenant":
                        self.registered = False
                    log.debug("wake: %s", e)
                    reply = None
                if reply is not None and reply.granted_bytes >= request:
                    self._standby, self._woken = None, True
                    return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(WAKE_POLL_S, remaining))
        with self._lock:
            log.warning("waking: the node agent did not grant the request within %.1f s", timeout_s)
            self._standby = "parked"
            self._send_release(0, 0)
        return False

    def start(self) -> None:
        """Heartbeat from a thread of its own from now on (the engine loads meanwhile), and
        watch for orders from another."""
        self._thread = threading.Thread(target=self._run, name="berth-memory-lease", daemon=True)
        self._thread.start()
        threading.Thread(target=self._watch_orders, name="berth-lease-orders", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._kick.wait(self.cycle_safely())
            self._kick.clear()  # a kick that came during the cycle is answered by the next one

    def _watch_orders(self) -> None:
        """Long-poll the agent for orders and cycle as soon as one comes: a park order for an
        idle runtime then takes effect when a wake needs its memory, not up to a heartbeat
        interval later (that wait would be part of the waking request's first token)."""
        s = self.settings
        while not self._stop.is_set():
            if not self.registered or self.stopped or self._standby is not None:
                self._stop.wait(self.interval_s)  # nothing to be ordered: holds nothing
                continue
            try:
                lease = self.client.orders(s.tenant, s.instance, ORDERS_WAIT_S)
            except AgentError as e:
                if e.code == "not_found" or e.status == 405:  # an agent without the endpoint
                    log.info("the node agent has no orders endpoint: orders come by heartbeat")
                    return
                self._stop.wait(self.interval_s)  # the heartbeats deal with it
                continue
            if lease.reclaim is not None:
                self._kick.set()
                self._stop.wait(self.interval_s)  # the cycle acts on it; no need to ask again

    def end(self) -> None:
        """Stop heartbeating and give the memory back to the agent at once (best effort: else
        the lease lapses)."""
        self._stop.set()
        self._kick.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        if self.registered and not self.stopped:
            try:
                self.client.deregister(self.settings.tenant, self.settings.instance)
            except AgentError as e:
                log.debug("deregistering failed: %s", e)
        self.registered = False

    def cycle_safely(self) -> float:
        try:
            return self.cycle()
        except Exception:  # a bug here must not take the engine down
            log.exception("memory lease cycle failed")
            return RETRY_S
