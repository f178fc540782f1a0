"""Generate the InferenceService CRD from the pydantic models (``berth crds``).

Pydantic emits JSON Schema (``$defs`` and ``$ref``, ``anyOf [X, null]`` for optional fields,
numeric ``exclusiveMinimum``); the API server wants a *structural* OpenAPI v3 schema: every node
typed, no references, ``exclusiveMinimum`` as a flag. ``structural()`` converts one into the
other, so the YAML in ``crds/`` is never written by hand and a test fails when it is stale.
"""

from pathlib import Path
from typing import Any

import yaml

from berth import wire
from berth.operator import api

CRD_FILE = f"{api.PLURAL}.{wire.GROUP}.yaml"
KEY_MESSAGE = (
    "every key must be a qualified name: an optional DNS prefix and '/', then at most 63 of "
    "[A-Za-z0-9-_.] beginning and ending with a letter or digit"
)

# JSON Schema keywords that carry over unchanged into a CRD schema.
_KEPT = {
    "description",
    "default",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "pattern",
    "enum",
    "format",
}


def structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Turn one pydantic JSON Schema node into a structural OpenAPI v3 node."""
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return structural(merged, defs)
    if "anyOf" in node:
        variants = [v for v in node["anyOf"] if v.get("type") != "null"]
        assert len(variants) == 1, f"unions other than X | None are not structural: {node}"
        outer = {
            k: v for k, v in node.items() if k != "anyOf" and not (k == "default" and v is None)
        }
        return structural({**variants[0], **outer}, defs)

    out: dict[str, Any] = {k: v for k, v in node.items() if k in _KEPT}
    if "const" in node:
        out["enum"] = [node["const"]]
    kind = node.get("type")
    if kind is None and "enum" in node:
        kind = "integer" if all(isinstance(v, int) for v in node["enum"]) else "string"
    if "exclusiveMinimum" in node:
        out["minimum"], out["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if "exclusiveMaximum" in node:
        out["maximum"], out["exclusiveMaximum"] = node["exclusiveMaximum"], True

    rules = list(node.get("x-kubernetes-validations") or [])
    if kind == "object":
        props = node.get("properties")
        extra = node.get("additionalProperties")
        if "patternProperties" in node:  # dict[ConstrainedKey, V]: CEL checks the keys
            ((key_pattern, extra),) = node["patternProperties"].items()
            key_length = (node.get("propertyNames") or {}).get("maxLength", 317)
            rule = f"self.all(k, size(k) <= {key_length} && k.matches({_cel_string(key_pattern)}))"
            rules.append({"rule": rule, "message": KEY_MESSAGE})
        if props:
            out["properties"] = {name: structural(p, defs) for name, p in props.items()}
            required = node.get("required")
            if required:
                out["required"] = required
        elif isinstance(extra, dict):
            out["additionalProperties"] = structural(extra, defs)
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        out["items"] = structural(node["items"], defs)
    if "x-kubernetes-preserve-unknown-fields" in node:
        out["x-kubernetes-preserve-unknown-fields"] = node["x-kubernetes-preserve-unknown-fields"]
    if rules:
        out["x-kubernetes-validations"] = rules
    return out if kind is None else {"type": kind, **out}


def _cel_string(text: str) -> str:
    """A CEL raw string literal (no escapes inside: regexes pass through unchanged)."""
    assert "'" not in text, text
    return f"r'{text}'"


def openapi_schema(model: type[api.ApiModel]) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return structural(schema, schema.get("$defs", {}))


def custom_resource_definition() -> dict[str, Any]:
    """The complete InferenceService CRD object."""
    spec = openapi_schema(api.InferenceServiceSpec)
    status = openapi_schema(api.InferenceServiceStatus)
    conditions = status["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    root = {
        "type": "object",
        "description": api.InferenceService.__doc__,
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "required": ["spec"],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{wire.GROUP}"},
        "spec": {
            "group": wire.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": api.SHORT_NAMES,
                "categories": ["berth"],
            },
            "versions": [
                {
                    "name": wire.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": root},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": _printer_columns(),
                }
            ],
        },
    }


def _printer_columns() -> list[dict[str, Any]]:
    def column(name: str, kind: str, path: str, priority: int = 0) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": name, "type": kind, "jsonPath": path}
        if priority:
            entry["priority"] = priority
        return entry

    return [
        column("Ready", "string", '.status.conditions[?(@.type=="Ready")].status'),
        column("Scheduled", "string", '.status.conditions[?(@.type=="Scheduled")].status'),
        column("Replicas", "integer", ".status.readyReplicas"),
        column("Standby", "integer", ".status.standbyReplicas", priority=1),
        column("GPU", "number", ".spec.gpu.fraction"),
        column("GPU-Mem", "string", ".spec.gpu.memory.request", priority=1),
        column("URL", "string", ".status.url", priority=1),
        column("Age", "date", ".metadata.creationTimestamp"),
    ]


def render_crds() -> dict[str, str]:
    """File name -> YAML text for everything under ``crds/``."""
    text = yaml.safe_dump(custom_resource_definition(), sort_keys=False, width=100)
    header = "# Generated by `berth crds` from berth/operator/api.py. Do not edit.\n"
    return {CRD_FILE: header + text}


def write_crds(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_crds().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written
