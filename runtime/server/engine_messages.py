"""The messages between the server process and the engine process, pickled over one pipe.

- server -> engine: :class:`AddRequests` (one HTTP request's sequences, taken all or none),
  :class:`AbortRequests`, :class:`ParkEngine`, :class:`WakeEngine` and :data:`STOP`;
- engine -> server: :class:`EngineReady` once the model is loaded (or :class:`EngineFailed`),
  then one :class:`StepReport` per iteration of the engine's loop, carrying every request's
  outputs of that step, the engine's stats and its warm-standby state, so the cost of the link
  grows with steps, not tokens.

No torch, fastapi or pydantic here: both processes import it.
"""

import dataclasses
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from berth.runtime.engine.outputs import RequestOutput
from berth.runtime.server.standby import ACTIVE

if TYPE_CHECKING:
    from berth.runtime.engine import EngineStats, SamplingParams


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
