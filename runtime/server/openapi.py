"""``/openapi.json``: the generation routes' request bodies and every route's error responses.

The generation routes read their bodies by hand (:mod:`.body`), so FastAPI cannot see their
request models; without this the schema would promise nothing about them, and neither clients
nor fuzzers could use it. Here the request models' JSON schemas are put into the components and
referenced as each route's ``requestBody``, and each route declares the statuses it answers
with, in OpenAI's error envelope.
"""

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from berth.runtime.server.protocol import ErrorResponse

Responses = dict[int | str, dict[str, Any]]


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


ERRORS: Responses = {
    404: _error("The model is not served here."),
    503: _error("The model is loading, failed to load, or the server is draining."),
}
TOKENIZER_ERRORS: Responses = {  # a route that reads a body and the model's tokenizer
    400: _error("The request is invalid; `param` names the field."),
    **ERRORS,
    408: _error("The body did not arrive within the server's timeout."),
    413: _error("The body or the prompt is larger than the server's limit."),
}
GENERATION_ERRORS: Responses = {
    **TOKENIZER_ERRORS,
    408: _error("The request or its body did not finish within the server's timeout."),
    429: _error("The waiting queue is full; retry after Retry-After seconds."),
    500: _error("The engine failed."),
}
PROBE: Responses = {
    503: {
        "description": "Not live or not ready; `reason` says why.",
        "content": {"application/json": {}},
    },
}


def generation_responses(body: type[BaseModel]) -> Responses:
    """A generation route's answers: ``body`` (or its SSE stream, with ``stream``) and errors."""
    # Each server-sent event: its ``data`` is a JSON chunk, or ``[DONE]`` at the end.
    event = {
        "type": "object",
        "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
        "required": ["data"],
    }
    events = {"text/event-stream": {"schema": event}}
    ok = {"model": body, "description": "The completion, or its chunks as server-sent events.",
          "content": events}  # fmt: skip
    return {200: ok, **GENERATION_ERRORS}


def install_openapi(app: FastAPI, bodies: dict[str, type[BaseModel]]) -> None:
    """Make ``app.openapi()`` describe ``bodies`` (path -> request model of its POST)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, defs = models_json_schema(
            [(model, "validation") for model in bodies.values()],
            ref_template="#/components/schemas/{model}",
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(defs.get("$defs", {}))
        for path, model in bodies.items():
            ref = {"$ref": f"#/components/schemas/{model.__name__}"}
            schema["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref}},
            }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
