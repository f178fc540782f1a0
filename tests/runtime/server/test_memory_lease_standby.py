"""The runtime's lease in warm standby, against a real ``berth node-agent`` process.

Three leases share one simulated GPU; each drives a small stand-in for the engine (its state,
resize and park: what the engine loop would do, without a model). The agent asks the idle one
to park when a parked one wakes on a full GPU; the lease parks its engine from the lease thread
and releases everything; a wake that cannot get memory in time gives up and says so.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from berth import wire
from berth.e2e.agent_process import MIB, AgentProcess, running_agent, wait_until_granting
from berth.runtime.engine.budget import GpuBudget, KvPlan, plan_kv_pool
from berth.runtime.server.agent_client import AgentClient
from berth.runtime.server.memory_lease import LeaseSettings, MemoryLease, MemoryState

GPU = "GPU-standby"
REQUEST = 48 * MIB  # two fit on the 100Mi GPU (4Mi reserved), three do not


@dataclass
class Engine:
    """Stands in for the engine loop: what it holds, whether it is parked, its traffic."""

    plan: KvPlan
    num_chunks: int
    in_flight: int = 0
    idle_s: float = 0.0
    parked: bool = False
    park_threads: list[str] = field(default_factory=list)

    def state(self) -> MemoryState:
        return MemoryState(self.plan, 0 if self.parked else self.num_chunks, 8, 0, 0,
                           self.in_flight, parked=self.parked, idle_s=self.idle_s)  # fmt: skip

    def resize(self, target: int) -> int:
        self.num_chunks = self.plan.chunks_within(target)
        return self.plan.held_bytes(self.num_chunks)

    def park(self) -> int:
        self.park_threads.append(threading.current_thread().name)
        self.parked, self.num_chunks = True, 0
        return 0


def until(what: str, predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s} s"
        time.sleep(0.05)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    flags = ["--simulate-gpus", f"{GPU}:100Mi", "--reserve", "4Mi", "--lease", "5",
             "--heartbeat-interval", "0.2", "--park-deadline", "5"]  # fmt: skip
    with running_agent(tmp_path, *flags) as process:
        wait_until_granting(process.client())
        yield process


def tenant(agent: AgentProcess, name: str, can_park: bool) -> tuple[MemoryLease, Engine]:
    """A runtime admitted by the agent and running its lease thread, engine loaded."""
    budget = GpuBudget(REQUEST, REQUEST, GPU)
    settings = LeaseSettings(str(agent.socket), f"test/{name}", f"{name}-1", can_park)
    lease = MemoryLease(AgentClient(str(agent.socket)), settings, budget, GPU)
    lease.admit()
    assert lease.granted_bytes == REQUEST
    engine = Engine(plan_kv_pool(budget, 8 * MIB, 0, MIB), 0)
    engine.num_chunks = engine.plan.request_chunks
    lease.attach(engine.state, engine.resize, engine.park)
    lease.start()
    return lease, engine


def idle_seconds(agent: AgentProcess, tenant: str) -> float:
    gpus = agent.client().get("/v1/gpus").json()["gpus"]
    return float(next(t["idle_s"] for g in gpus for t in g["tenants"] if t["tenant"] == tenant))


def states(agent: AgentProcess) -> dict[str, str]:
    gpus = agent.client().get("/v1/gpus").json()["gpus"]
    return {t["tenant"]: t["state"] for g in gpus for t in g["tenants"]}


def test_a_wake_on_a_full_gpu_parks_the_idle_runtime_through_its_lease(
    agent: AgentProcess,
) -> None:
    idle, idle_engine = tenant(agent, "idle", can_park=True)
    sleeper, sleeper_engine = tenant(agent, "sleeper", can_park=True)
    try:
        sleeper_engine.parked = True  # parked on its own (idle timeout), then tells the agent
        sleeper.parked()
        assert states(agent)["test/sleeper"] == "parked"
        busy, busy_engine = tenant(agent, "busy", can_park=False)  # takes the room
        busy_engine.in_flight = 2
        idle_engine.idle_s = 12.0
        until("idle heartbeats", lambda: states(agent)["test/idle"] == "active")

        assert sleeper.wake(timeout_s=10.0)  # the agent parks "idle" for it
        assert idle_engine.parked and idle_engine.park_threads == ["berth-park"]
        assert idle.standby and idle.num_parks == 1 and not sleeper.standby
        assert states(agent) == {"test/idle": "parked", "test/sleeper": "active",
                                 "test/busy": "active"}  # fmt: skip
        sleeper_engine.parked = False  # maps its request back
        until("the woken runtime reports it", lambda: sleeper.granted_bytes == REQUEST)

        # Now nobody is idle: "idle" cannot get its request back and stays parked.
        sleeper_engine.in_flight = 1
        time.sleep(0.5)  # a heartbeat says so
        started = time.monotonic()
        assert not idle.wake(timeout_s=1.0)
        assert 1.0 <= time.monotonic() - started < 3.0
        assert idle.standby and states(agent)["test/idle"] == "parked"
        assert not sleeper_engine.parked and not busy_engine.parked
        busy.end()
    finally:
        idle.end()
        sleeper.end()


def test_a_wake_that_begins_before_an_asked_park_ends_keeps_the_grant(
    agent: AgentProcess,
) -> None:
    """The engine parks at the agent's request, then a request arrives and it wakes before the
    lease has released anything: the lease must not release the memory the wake now uses."""
    lease, engine = tenant(agent, "racer", can_park=True)
    resume = threading.Event()
    parked_once = threading.Event()

    def slow_park() -> int:  # parked at once; the lease hears of it only later
        engine.park()
        parked_once.set()
        resume.wait(10)
        return 0

    lease.attach(engine.state, engine.resize, slow_park)
    engine.idle_s = 5.0
    newcomer = None
    try:
        until("an idle heartbeat", lambda: states(agent)["test/racer"] == "active")
        newcomer = pending(agent, "newcomer", 60 * MIB)  # needs "racer" to park
        assert parked_once.wait(10)
        engine.in_flight, engine.idle_s = 1, 0.0  # a request came in: wake
        assert lease.wake(timeout_s=5.0)  # still granted: nothing was released
        engine.parked = False
        resume.set()
        time.sleep(1.0)  # the park's thread ends, and heartbeats go on
        gpus = agent.client().get("/v1/gpus").json()["gpus"]
        racer = next(t for g in gpus for t in g["tenants"] if t["tenant"] == "test/racer")
        assert racer["granted_bytes"] == REQUEST and racer["state"] != "parked"
        assert not lease.standby
    finally:
        resume.set()
        lease.end()
        if newcomer is not None:
            newcomer.end()


def test_a_standby_runtime_refused_on_a_full_gpu_waits_its_turn_instead_of_loading(
    agent: AgentProcess,
) -> None:
    """The scheduler overcommits standby tenants: a newcomer may find the GPU held by resident
    ones. It must not load into their memory: it waits until one idles and the agent parks it.
    A runtime without standby, refused, starts within its request at once (its request was
    reserved by the scheduler)."""
    busy, busy_engine = tenant(agent, "busy", can_park=False)
    resident, resident_engine = tenant(agent, "resident", can_park=True)
    busy_engine.in_flight = resident_engine.in_flight = 1
    budget = GpuBudget(REQUEST, REQUEST, GPU)

    def newcomer(name: str, can_park: bool) -> MemoryLease:
        settings = LeaseSettings(str(agent.socket), f"test/{name}", f"{name}-1", can_park)
        return MemoryLease(AgentClient(str(agent.socket)), settings, budget, GPU)

    plain = newcomer("plain", can_park=False)
    started = time.monotonic()
    plain.admit()
    assert not plain.registered and time.monotonic() - started < 1.0

    late = newcomer("late", can_park=True)
    admitted = threading.Thread(target=late.admit, daemon=True)
    try:
        until("busy heartbeats", lambda: states(agent)["test/resident"] == "active")
        admitted.start()
        admitted.join(2.5)  # two refusals, one a second: still waiting
        assert admitted.is_alive() and not late.registered
        resident_engine.in_flight, resident_engine.idle_s = 0, 3.0  # idles: the agent parks it
        admitted.join(10.0)
        assert not admitted.is_alive() and late.registered and late.granted_bytes == REQUEST
        assert resident_engine.parked and resident.standby
        assert states(agent)["test/resident"] == "parked"
    finally:
        late.end()
        resident.end()
        busy.end()


def test_a_park_order_reaches_the_idle_runtime_when_issued_not_at_its_next_heartbeat(
    tmp_path: Path,
) -> None:
    """With 3 s between heartbeats, a wake that needs an idle runtime parked would wait up to
    3 s for that runtime to hear of it; its orders long poll brings the order at once."""
    flags = ["--simulate-gpus", f"{GPU}:100Mi", "--reserve", "4Mi", "--lease", "10",
             "--heartbeat-interval", "3", "--park-deadline", "5"]  # fmt: skip
    with running_agent(tmp_path, *flags) as slow:
        wait_until_granting(slow.client())
        idle, idle_engine = tenant(slow, "idle", can_park=True)
        sleeper, sleeper_engine = tenant(slow, "sleeper", can_park=True)
        busy, busy_engine = None, None
        try:
            sleeper_engine.parked = True
            sleeper.parked()
            busy, busy_engine = tenant(slow, "busy", can_park=False)  # takes the room
            busy_engine.in_flight = 1
            idle_engine.idle_s = 12.0
            until("an idle heartbeat", lambda: idle_seconds(slow, "test/idle") > 0, 8.0)
            started = time.monotonic()
            assert sleeper.wake(timeout_s=10.0)
            took = time.monotonic() - started
            assert idle_engine.parked and idle.num_parks == 1
            assert took < 1.5, f"the wake took {took:.2f} s: the park order waited for a heartbeat"
        finally:
            for lease in (idle, sleeper, busy):
                if lease is not None:
                    lease.end()


def pending(agent: AgentProcess, name: str, request: int) -> MemoryLease:
    """A runtime that registers and heartbeats without waiting for its grant (it maps nothing
    while it waits for room)."""
    budget = GpuBudget(request, request, GPU)
    settings = LeaseSettings(str(agent.socket), f"test/{name}", f"{name}-1", False)
    lease = MemoryLease(AgentClient(str(agent.socket)), settings, budget, GPU)
    lease.start()
    return lease


def test_without_the_agent_a_wake_fails_in_time(tmp_path: Path) -> None:
    budget = GpuBudget(REQUEST, REQUEST, GPU)
    socket = str(tmp_path / "nobody.sock")
    lease = MemoryLease(AgentClient(socket), LeaseSettings(socket, "test/x", "x-1", True), budget,
                        GPU)  # fmt: skip
    lease.parked()
    started = time.monotonic()
    assert not lease.wake(timeout_s=0.5)
    assert time.monotonic() - started < 2.0 and lease.standby


def test_standby_is_on_when_its_idle_seconds_are_set() -> None:
    assert LeaseSettings.from_env({wire.ENV_STANDBY_IDLE_SECONDS: "0"}).can_park
    assert LeaseSettings.from_env({wire.ENV_STANDBY_IDLE_SECONDS: "300"}).can_park
    assert not LeaseSettings.from_env({}).can_park
