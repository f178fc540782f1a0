"""What the runtime asks the node agent for: room under memory pressure, its burst back when idle."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from berth.runtime.engine.budget import GpuBudget, plan_kv_pool
from berth.runtime.server.memory_lease import LeaseSettings, MemoryState, desired_bytes

CHUNK = 1 << 20
PLAN = plan_kv_pool(GpuBudget(10 * CHUNK, 30 * CHUNK), 2 * CHUNK, CHUNK, CHUNK)  # 7..27 chunks


def _state(chunks: int, used: int, waiting: int = 0, blocked: int = 0) -> MemoryState:
    return MemoryState(PLAN, chunks, 8, used, waiting, waiting + 1, blocked_blocks=blocked)


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


def test_a_request_the_free_blocks_cannot_hold_asks_for_room_at_any_usage() -> None:
    """A pool smaller than one prompt: usage stays at 0 % while the prompt waits (the H100 run
    of colocate.py (a) where llama-3-8b's request held 2,048 tokens of KV and its 2,176-token
    requests waited forever). Its blocks count as used: 60 blocks run at 60 % in 13 chunks."""
    assert desired_bytes(_state(7, 0, waiting=4, blocked=60)) == PLAN.held_bytes(13)
    assert desired_bytes(_state(7, 50, waiting=1, blocked=2)) == PLAN.held_bytes(11)
    assert desired_bytes(_state(26, 0, waiting=1, blocked=400)) == PLAN.held_bytes(27)  # limit


def test_an_idle_burst_is_given_back_down_to_what_is_used_never_below_the_request() -> None:
    assert desired_bytes(_state(20, 0)) == PLAN.held_bytes(7)
    held = desired_bytes(_state(20, 40))  # usage 0.25: 40 blocks need 9 chunks at 60%
    assert held == PLAN.held_bytes(9)
    assert desired_bytes(_state(20, 40, waiting=1)) == PLAN.held_bytes(20)  # not while some wait


def test_moderate_usage_keeps_what_is_held() -> None:
    assert desired_bytes(_state(12, 50)) == PLAN.held_bytes(12)


@given(
    chunks=st.integers(7, 27),
    used=st.integers(0, 27 * 8),
    waiting=st.integers(0, 3),
    blocked=st.integers(0, 300),
)
def test_the_wish_stays_between_the_request_and_the_limit(
    chunks: int, used: int, waiting: int, blocked: int
) -> None:
    used = min(used, chunks * 8)
    blocked = blocked if waiting else 0
    want = desired_bytes(_state(chunks, used, waiting, blocked))
    assert PLAN.held_bytes(PLAN.request_chunks) <= want <= PLAN.budget.limit_bytes
    wanted_blocks = (want - PLAN.non_kv_bytes) // CHUNK * 8
    if want < PLAN.held_bytes(chunks):  # giving back never drops below what is in use
        assert wanted_blocks >= used
    if blocked:  # a waiting request gets room for all of it, as far as the limit allows
        assert wanted_blocks >= min(used + blocked, PLAN.limit_chunks * 8)


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
