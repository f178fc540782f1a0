"""Schemathesis fuzzes a real server from the server's own ``/openapi.json``: valid and invalid
bodies, every route. No answer may be a 5xx, a status or content type the schema does not
declare, or a body that violates its declared schema; invalid data must be refused."""

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from server_harness import RunningServer, running_server

from berth.runtime.engine import EngineConfig

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
GENERATION = {"/v1/completions", "/v1/chat/completions"}
EXAMPLES = 25  # per operation and mode: the whole run stays under a minute on two cores


@schemathesis.hook
def map_body(context: Any, body: Any) -> Any:
    """Name the served model in generated bodies, so that they reach the engine instead of all
    ending as 404s (a ``model`` of the wrong type is left alone: it is the invalid part)."""
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        return {**body, "model": "tiny"}
    return body


@pytest.fixture(scope="module")
def fuzzed(engine_config: EngineConfig) -> Iterator[RunningServer]:
    """A short request timeout and a small waiting room keep a generated ``n: 64`` of 500
    tokens from holding the run: it is refused or times out, both declared answers."""
    with running_server(engine_config, request_timeout_s=2, max_waiting_requests=8) as server:
        yield server


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_server_answers_anything_its_schema_allows_without_a_5xx(
    fuzzed: RunningServer, mode: GenerationMode
) -> None:
    """Every operation of the live schema, ``EXAMPLES`` cases each (schemathesis' pytest
    loader ``from_fixture`` fails on pytest 9, so the cases are drawn here)."""
    schema = schemathesis.openapi.from_url(f"{fuzzed.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= GENERATION
    statuses: Counter[int] = Counter()
    for operation in operations:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],  # no shrinking against a live server
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def call(case: Any) -> None:
            response = case.call_and_validate(checks=CHECKS, timeout=30)
            statuses[response.status_code] += 1

        try:
            call()
        except Unsatisfiable:
            # Nothing of this request can be made invalid (a probe; a free-form path string).
            assert mode is GenerationMode.NEGATIVE and operation.path not in GENERATION, operation
    # Valid cases reached the engine; invalid ones (the bodies) were refused.
    if mode is GenerationMode.POSITIVE:
        assert statuses[200] >= 5, statuses
    else:
        assert sum(n for status, n in statuses.items() if 400 <= status < 500) > EXAMPLES, statuses
