"""The CRD is generated from the API models, structural, and committed up to date."""

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from berth.operator import api, crd

ROOT = Path(__file__).resolve().parents[2]


def test_committed_crds_match_the_api_models() -> None:
    for name, text in crd.render_crds().items():
        committed = ROOT / "crds" / name
        assert committed.exists(), f"crds/{name} missing: run `berth crds`"
        assert committed.read_text() == text, f"crds/{name} is stale: run `berth crds`"


def walk(node: dict[str, Any], path: str = "") -> list[str]:
    """Paths of schema nodes that break the structural rules (untyped, refs, unions)."""
    bad = []
    if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        bad.append(path or "<root>")
    bad += [
        f"{path}: {k}" for k in ("$ref", "anyOf", "oneOf", "allOf", "$defs", "title") if k in node
    ]
    for name, child in (node.get("properties") or {}).items():
        bad += walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        bad += walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        bad += walk(node["additionalProperties"], f"{path}{{}}")
    return bad


def test_schema_is_structural_with_descriptions_defaults_and_cel() -> None:
    version = crd.custom_resource_definition()["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    assert walk(schema) == []
    spec = schema["properties"]["spec"]["properties"]
    assert spec["runtime"]["properties"]["blockSize"]["default"] == 16
    assert spec["gpu"]["properties"]["fraction"]["exclusiveMinimum"] is True
    assert spec["gpu"]["properties"]["fraction"]["description"]
    assert spec["replicas"]["minimum"] == 0
    rules = [r["rule"] for r in spec["gpu"]["properties"]["memory"]["x-kubernetes-validations"]]
    assert any("quantity(self.request)" in r for r in rules)
    assert set(version["subresources"]) == {"status", "scale"}
    assert {c["name"] for c in version["additionalPrinterColumns"]} >= {"Ready", "GPU", "Age"}


def undescribed(node: dict[str, Any], path: str) -> list[str]:
    """Fields below ``path`` without a description (what ``kubectl explain`` would leave blank)."""
    found = []
    for name, child in (node.get("properties") or {}).items():
        here = f"{path}.{name}"
        found += [here] if not child.get("description") else []
        found += undescribed(child, here)
    if isinstance(node.get("items"), dict):
        found += undescribed(node["items"], f"{path}[]")
    return found


def test_every_spec_field_has_a_description_for_kubectl_explain() -> None:
    schema = crd.custom_resource_definition()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert undescribed(schema["properties"]["spec"], "spec") == []


def test_short_names_do_not_clash_with_kserve() -> None:
    names = crd.custom_resource_definition()["spec"]["names"]
    assert "isvc" not in names["shortNames"]


def manifest(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"source": {"uri": "hf://org/model"}},
        "gpu": {"fraction": 0.5},
    }
    return {
        "apiVersion": "berth.dev/v1alpha1",
        "kind": "InferenceService",
        "spec": {**base, **spec},
    }


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"gpu": {"fraction": 0}}, "fraction"),
        ({"gpu": {"fraction": 1.5}}, "fraction"),
        (
            {"gpu": {"memory": {"request": "40Gi", "limit": "20Gi"}}},
            "request must not exceed limit",
        ),
        (
            {"gpu": {"fraction": 0.5, "memory": {"request": "1Gi"}}},
            "exactly one of fraction or memory",
        ),
        ({"replicas": -1}, "replicas"),
        ({"minReplicas": 3, "maxReplicas": 2}, "maxReplicas"),
        ({"colour": "blue"}, "colour"),
        ({"model": {"source": {}}}, "exactly one of pvc"),
        ({"model": {"source": {"random": {"shape": "gpt-9"}}}}, "shape"),
        (
            {"model": {"source": {"random": {"shape": "tiny"}, "hostPath": {"path": "/m"}}}},
            "exactly one of pvc",
        ),
    ],
)
def test_python_validation_refuses_what_the_crd_refuses(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        api.InferenceService.model_validate(manifest(**spec))


def test_examples_are_valid_services() -> None:
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == api.KIND:
                api.InferenceService.model_validate(doc)


def test_desired_replicas_clamps_to_bounds() -> None:
    spec = api.InferenceService.model_validate(manifest(minReplicas=2, maxReplicas=4)).spec
    assert spec.desired_replicas() == 2
    assert spec.model_copy(update={"replicas": 3}).desired_replicas() == 3
    assert spec.model_copy(update={"replicas": 0}).desired_replicas() == 2


NOT_IMPLEMENTED = "s3:// and gs:// model URIs are not implemented"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"uri": "s3://bucket/llama"}, NOT_IMPLEMENTED),
        ({"uri": "gs://bucket/llama"}, NOT_IMPLEMENTED),
        ({"uri": "ftp://host/llama.tar"}, "uri must start with https://, http:// or hf://"),
        ({"uri": "hf://just-a-name"}, "hf://org/repo or hf://org/repo@revision"),
        ({"uri": "hf://org/repo", "sha256": "a" * 64}, "pin hf:// with @revision"),
        ({"uri": "https://h/m.tar", "sha256": "ABC"}, "sha256"),
        ({"pvc": {"claimName": "m", "path": "../other"}}, "inside the volume"),
        ({"image": {"reference": "r/w:1", "path": "a/../../b"}}, "inside the volume"),
    ],
)
def test_unfetchable_model_sources_are_refused_with_the_reason(
    source: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message.replace(".", r"\.")):
        api.InferenceService.model_validate(manifest(model={"source": source}))


@pytest.mark.parametrize(
    "source",
    [
        {"uri": "https://models.internal/smollm2.tar.gz", "sha256": "0" * 64},
        {"uri": "http://10.0.0.5:8080/smollm2.tgz"},
        {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct@main"},
        {"pvc": {"claimName": "m", "path": "team/llama..v2"}},
    ],
)
def test_fetchable_model_sources_are_accepted(source: dict[str, Any]) -> None:
    api.InferenceService.model_validate(manifest(model={"source": source}))


def test_the_crd_refuses_s3_and_gs_uris_with_the_same_message() -> None:
    """The rule the API server runs at admission (e2e/test_model_sources.py runs it for real)."""
    version = crd.custom_resource_definition()["spec"]["versions"][0]
    source = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["model"]
    uri = source["properties"]["source"]["properties"]["uri"]
    rules = {r["rule"]: r["message"] for r in uri["x-kubernetes-validations"]}
    assert rules["!self.matches('^(s3|gs)://')"].startswith(NOT_IMPLEMENTED)
    assert uri["maxLength"] == 2048  # CEL cost is bounded by the string's length
