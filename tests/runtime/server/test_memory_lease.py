"""What the runtime asks the node agent for: room under memory pressure, its burst back when idle."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from berth.runtime.engine.budget import GpuBudget, plan_kv_pool
from berth.runtime.server.memory_lease import LeaseSettings, MemoryState, desired_bytes

CHUNK = 1 << 20
PLAN = plan_kv_pool(GpuBudget(10 * CHUNK, 30 * CHUNK), 2 * CHUNK, CHUNK, CHUNK)  # 7..27 chunks


def _state(chunks: int, used: int, waiting: int = 0) -> MemoryState:
    return MemoryState(PLAN, chunks, 8, used, waiting, waiting + 1)


def test_a_nearly_full_pool_asks_for_room_to_run_at_the_target_usage() -> None:
    # 56 of 56 blocks used: 12 chunks run them at 60%; the limit caps a bigger wish.
    assert desired_bytes(_state(7, 7 * 8)) == PLAN.held_bytes(12)
    assert desired_bytes(_state(7, 7 * 8, waiting=3)) == PLAN.held_bytes(12)
    assert desired_bytes(_state(20, 20 * 8)) == PLAN.held_bytes(27)  # 34 chunks, capped
    # Just at the threshold it still asks for at least one chunk more.
    assert desired_bytes(_state(10, 68)) == PLAN.held_bytes(15)


def test_a_request_waiting_with_room_to_spare_asks_for_nothing_more() -> None:
    """A prompt waits a step for the token budget, not for memory: no burst for it."""
    assert desired_bytes(_state(7, 10, waiting=1)) == PLAN.held_bytes(7)


def test_an_idle_burst_is_given_back_down_to_what_is_used_never_below_the_request() -> None:
    assert desired_bytes(_state(20, 0)) == PLAN.held_bytes(7)
    held = desired_bytes(_state(20, 40))  # usage 0.25: 40 blocks need 9 chunks at 60%
    assert held == PLAN.held_bytes(9)
    assert desired_bytes(_state(20, 40, waiting=1)) == PLAN.held_bytes(20)  # not while some wait


def test_moderate_usage_keeps_what_is_held() -> None:
    assert desired_bytes(_state(12, 50)) == PLAN.held_bytes(12)


@given(chunks=st.integers(7, 27), used=st.integers(0, 27 * 8), waiting=st.integers(0, 3))
def test_the_wish_stays_between_the_request_and_the_limit(
    chunks: int, used: int, waiting: int
) -> None:
    used = min(used, chunks * 8)
    want = desired_bytes(_state(chunks, used, waiting))
    assert PLAN.held_bytes(PLAN.request_chunks) <= want <= PLAN.budget.limit_bytes
    if want < PLAN.held_bytes(chunks):  # giving back never drops below what is in use
        assert (want - PLAN.non_kv_bytes) // CHUNK * 8 >= used


@given(chunks=st.integers(7, 27), used=st.integers(0, 27 * 8), waiting=st.integers(0, 3))
def test_a_granted_resize_holds_still_at_the_same_load(
    chunks: int, used: int, waiting: int
) -> None:
    """No thrash: once the pool has the size it asked for, the same demand asks for that size
    again (a grow never lands where a release starts, nor a release where a grow starts)."""
    used = min(used, chunks * 8)
    want = desired_bytes(_state(chunks, used, waiting))
    resized = PLAN.chunks_within(want)
    if resized != chunks:
        again = desired_bytes(_state(resized, min(used, resized * 8), waiting))
        assert again == PLAN.held_bytes(resized) or resized == PLAN.limit_chunks


def test_lease_settings_name_the_pod_as_the_tenant() -> None:
    env = {"POD_NAMESPACE": "team", "POD_NAME": "llama-0", "BERTH_AGENT_SOCKET": "/tmp/a.sock"}
    settings = LeaseSettings.from_env(env)
    assert settings.tenant == "team/llama-0" and settings.socket_path == "/tmp/a.sock"
    assert settings.instance != LeaseSettings.from_env(env).instance  # a new lease per start
