"""Warm standby's state machine: only ARCHITECTURE's transitions (plus the failed wake) happen,
every other move is refused with a message naming the allowed ones, and the counters add up."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from berth.runtime.server.standby import (
    ACTIVE,
    LOADING,
    PARKING,
    STANDBY,
    TRANSITIONS,
    WAKING,
    InvalidTransition,
    Residency,
    StandbyPolicy,
    StandbyState,
)

# loading -> active <-> parking -> standby -> waking -> active, and waking -> standby (no memory)
ALLOWED = {
    (LOADING, ACTIVE),
    (ACTIVE, PARKING),
    (PARKING, ACTIVE),
    (PARKING, STANDBY),
    (STANDBY, WAKING),
    (WAKING, ACTIVE),
    (WAKING, STANDBY),
}


def test_the_table_is_the_architecture_diagram() -> None:
    table = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert table == ALLOWED


@given(st.lists(st.sampled_from(list(StandbyState)), max_size=60))
def test_any_sequence_of_moves_keeps_only_allowed_transitions(moves: list[StandbyState]) -> None:
    residency = Residency()
    parks = wakes = failed = 0
    for to in moves:
        before = residency.state
        if (before, to) in ALLOWED:
            residency.move(to)
            assert residency.state is to
            parks += (before, to) == (PARKING, STANDBY)
            wakes += (before, to) == (WAKING, ACTIVE)
            failed += (before, to) == (WAKING, STANDBY)
        else:
            with pytest.raises(InvalidTransition) as refused:
                residency.move(to)
            assert residency.state is before  # a refused move changes nothing
            message = str(refused.value)
            assert f"from {before.value} to {to.value}" in message
            for allowed in TRANSITIONS[before]:
                assert allowed.value in message
        assert residency.resident == (residency.state is ACTIVE)
        assert residency.steps == (residency.state in (ACTIVE, PARKING))
    assert (residency.parks, residency.wakes, residency.failed_wakes) == (parks, wakes, failed)


@given(st.integers(min_value=1, max_value=20))
def test_park_wake_cycles_return_to_active(cycles: int) -> None:
    residency = Residency()
    residency.move(ACTIVE)
    for _ in range(cycles):
        for to in (PARKING, STANDBY, WAKING, ACTIVE):
            residency.move(to)
    assert residency.state is ACTIVE
    assert residency.parks == residency.wakes == cycles


def test_nothing_but_a_finished_load_leaves_loading() -> None:
    for to in (PARKING, STANDBY, WAKING, LOADING):
        with pytest.raises(InvalidTransition, match="from loading it may go to: active"):
            Residency().move(to)


@given(
    st.one_of(st.none(), st.floats(min_value=0, max_value=1e6)),
    st.floats(min_value=0, max_value=2e6),
)
def test_the_idle_timeout_is_due_only_when_set_positive_and_reached(
    idle: float | None, waited: float
) -> None:
    policy = StandbyPolicy(idle_s=idle)
    assert policy.enabled == (idle is not None)
    assert policy.idle_park_due(waited) == (idle is not None and idle > 0 and waited >= idle)
