"""Warm standby's state machine: where the runtime's weights and KV live, and how that may change.

ARCHITECTURE section 5 draws it::

    loading -> active <-> parking -> standby -> waking -> active
                                        ^           |
                                        +-----------+  (the wake got no memory in time)

``active -> parking``: an idle timeout, ``POST /admin/park`` or the node agent asked to park;
``parking -> active``: the park was given up (the engine could not release its memory);
``parking -> standby``: the weights and KV are off the device (a pinned host copy remains);
``standby -> waking``: a request came, or ``POST /admin/wake``, or the agent's grant;
``waking -> active``: weights copied back, KV remapped at the same addresses. The one edge the
diagram of ARCHITECTURE leaves implicit, ``waking -> standby``, is the failed wake: the node
agent did not grant the memory in time (or the driver had none), so the weights are still off
the device and the requests that waited get 503 with Retry-After. Every other move is refused
with :class:`InvalidTransition`.

Pure: no clock, no I/O. The engine process owns one :class:`Residency` (it does the work); the
server mirrors its state from the engine's reports (metric ``berth_standby_state``, ``/health``).
"""

import enum
from dataclasses import dataclass
from typing import Final


class StandbyState(enum.Enum):
    """The runtime's residency on its GPU."""

    LOADING = "loading"
    ACTIVE = "active"
    PARKING = "parking"
    STANDBY = "standby"
    WAKING = "waking"


LOADING, ACTIVE, PARKING, STANDBY, WAKING = StandbyState

TRANSITIONS: Final[dict[StandbyState, frozenset[StandbyState]]] = {
    LOADING: frozenset({ACTIVE}),
    ACTIVE: frozenset({PARKING}),
    PARKING: frozenset({ACTIVE, STANDBY}),
    STANDBY: frozenset({WAKING}),
    WAKING: frozenset({ACTIVE, STANDBY}),
}


class InvalidTransition(ValueError):
    """A move the state machine does not allow; the message names what is allowed instead."""


@dataclass
class Residency:
    """The current state and how many times each kind of move happened (for logs and tests)."""

    state: StandbyState = LOADING
    parks: int = 0  # completed parks (parking -> standby)
    wakes: int = 0  # completed wakes (waking -> active)
    failed_wakes: int = 0  # waking -> standby

    def move(self, to: StandbyState) -> None:
        """Go to ``to``, or raise :class:`InvalidTransition` leaving the state as it was."""
        allowed = TRANSITIONS[self.state]
        if to not in allowed:
            names = ", ".join(sorted(s.value for s in allowed)) or "none"
            raise InvalidTransition(
                f"the runtime cannot go from {self.state.value} to {to.value} "
                f"(from {self.state.value} it may go to: {names})"
            )
        if (self.state, to) == (PARKING, STANDBY):
            self.parks += 1
        elif (self.state, to) == (WAKING, ACTIVE):
            self.wakes += 1
        elif (self.state, to) == (WAKING, STANDBY):
            self.failed_wakes += 1
        self.state = to

    @property
    def resident(self) -> bool:
        """Active: the engine takes new requests."""
        return self.state is ACTIVE

    @property
    def steps(self) -> bool:
        """The weights are on the device and the engine steps (while parking, the sequences
        that run may finish)."""
        return self.state in (ACTIVE, PARKING)


@dataclass(frozen=True)
class StandbyPolicy:
    """When and how the runtime parks; read once from settings, sent to the engine process.

    ``idle_s`` None: standby is off (no host copy of the weights, nothing parks); 0: park only
    when asked (admin endpoint, node agent); > 0: also after that many idle seconds.
    """

    idle_s: float | None = None
    park_deadline_s: float = 30.0  # running sequences may finish for this long, then preempted
    wake_timeout_s: float = 60.0  # a wake that gets no memory by then fails its requests (503)

    @property
    def enabled(self) -> bool:
        return self.idle_s is not None

    def idle_park_due(self, idle_s: float) -> bool:
        """True when an idle timeout is set and ``idle_s`` seconds without requests reach it."""
        return self.idle_s is not None and self.idle_s > 0 and idle_s >= self.idle_s
