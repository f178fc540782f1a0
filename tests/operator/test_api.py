"""The API models refuse what admission refuses, naming the field, and say which accepted fields
no controller acts on yet."""

import re
from typing import Any

import pytest
from pydantic import ValidationError

from berth.e2e.admission_cases import (
    ACCEPTED,
    REFUSED,
    Refused,
    accepted_spec,
    refused_spec,
    valid_spec,
)
from berth.operator import api, api_types


def parse(spec: dict[str, Any]) -> api.InferenceService:
    manifest = {"apiVersion": "berth.dev/v1alpha1", "kind": "InferenceService", "spec": spec}
    return api.InferenceService.model_validate(manifest)


@pytest.mark.parametrize("case", REFUSED, ids=[c.id for c in REFUSED])
def test_models_refuse_each_invalid_value_naming_its_field(case: Refused) -> None:
    with pytest.raises(ValidationError) as raised:
        parse(refused_spec(case))
    text = api_types.field_errors(raised.value)
    path, _, message = text.partition(": ")
    expected = re.sub(r"\[([^\]\d][^\]]*)\]", r".\1", case.path)  # requests[cpu]: a map key
    assert path.startswith(expected) or expected.startswith(path), text
    assert (case.python_says or case.says) in message, text


@pytest.mark.parametrize("spec", ACCEPTED)
def test_models_accept_valid_values_next_to_the_refused_ones(spec: dict[str, Any]) -> None:
    parse(accepted_spec(spec))


def test_field_errors_spell_paths_as_the_api_server_does() -> None:
    with pytest.raises(ValidationError) as raised:
        parse({**valid_spec(), "sandbox": {"egress": [{"ports": [1, 0]}]}})
    assert api_types.field_errors(raised.value).startswith("spec.sandbox.egress[0].ports[1]: ")


@pytest.mark.parametrize(
    ("spec", "ignored"),
    [
        ({}, ()),
        ({"autoscaling": {"targetConcurrency": 4}}, ()),
        ({"standby": {"enabled": True}}, ()),
        ({"sandbox": {"runtimeClassName": "gvisor"}}, ()),
        ({"sandbox": {"runtimeClassName": "gvisor", "enabled": False}}, ()),
        ({"sandbox": {"enabled": True, "deniedSyscalls": ["ptrace"]}}, ()),
        ({"sandbox": {"maxRequestSeconds": 30}}, ()),
        (
            {"autoscaling": {"targetConcurrency": 4}, "sandbox": {"egress": [{"ports": [443]}]}},
            ("spec.sandbox.egress",),
        ),
        (
            {
                "sandbox": {
                    "enabled": False,
                    "ingress": [{"cidrs": ["10.0.0.0/8"]}],
                    "deniedSyscalls": ["ptrace"],
                }
            },
            ("spec.sandbox.ingress", "spec.sandbox.deniedSyscalls"),
        ),
        # Standby replicas that never park need Berth's autoscaler to keep them active.
        ({"standby": {"minActiveReplicas": 1}}, ("spec.standby.minActiveReplicas",)),
        ({"standby": {"minActiveReplicas": 1}, "autoscaling": {}}, ()),
        # An external HPA or KEDA reads none of Berth's autoscaling knobs.
        (
            {"autoscaling": {"mode": "external", "targetConcurrency": 4, "panicThreshold": 3}},
            ("spec.autoscaling.targetConcurrency", "spec.autoscaling.panicThreshold"),
        ),
        ({"autoscaling": {"mode": "external"}}, ()),
        ({"autoscaling": {"targetConcurrency": 4, "panicThreshold": 3}}, ()),
    ],
)
def test_fields_not_acted_on_names_what_a_spec_sets_beyond_the_defaults(
    spec: dict[str, Any], ignored: tuple[str, ...]
) -> None:
    assert api.fields_not_acted_on(parse({**valid_spec(), **spec}).spec) == ignored


def test_defaults_the_api_server_fills_in_are_not_reported_as_set() -> None:
    """The API server stores ``sandbox.enabled: false`` and empty lists as defaults."""
    stored = {"runtimeClassName": "gvisor", "enabled": False, "egress": [], "deniedSyscalls": []}
    assert api.fields_not_acted_on(parse({**valid_spec(), "sandbox": stored}).spec) == ()


def test_every_field_listed_as_not_acted_on_exists_in_the_spec() -> None:
    for path in api.NOT_ACTED_ON + api.SEALED_ONLY + api.AUTOSCALER_ONLY:
        model: Any = api.InferenceServiceSpec
        for part in path.split("."):
            field = next(f for n, f in model.model_fields.items() if (f.alias or n) == part)
            model = next(
                (
                    a
                    for a in getattr(field.annotation, "__args__", ())
                    if hasattr(a, "model_fields")
                ),
                field.annotation,
            )
    assert "sandbox.runtimeClassName" not in api.NOT_ACTED_ON  # rendered as runtimeClassName
