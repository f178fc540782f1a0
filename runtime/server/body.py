"""Reading a request body into a protocol model, refusing each kind of bad input with a 4xx.

The body is read by hand rather than through FastAPI's parameter injection so that every
failure has its own clear message: too large (413, decided from Content-Length before reading
and enforced while streaming, so a huge body never sits in memory), not UTF-8, not JSON, and
not the expected shape (400 naming the field).
"""

from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from berth.runtime.server.errors import APIError, from_validation_error, invalid_request

Model = TypeVar("Model", bound=BaseModel)


def _too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"The request body is larger than the server's limit of {limit} bytes.",
        code="request_too_large",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, at most ``limit`` bytes; larger bodies are refused without buffering."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise invalid_request("The Content-Length header is not a number.")
        if int(declared) > limit:
            raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_body(request: Request, model: type[Model], limit: int) -> Model:
    """The body validated as ``model``; raises :class:`APIError` (4xx) for any bad input."""
    raw = await read_body(request, limit)
    if not raw.strip():
        raise invalid_request("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid_request(
            f"The request body is not valid UTF-8 (byte {exc.start}).", code="invalid_encoding"
        ) from exc
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        raise from_validation_error(exc) from exc
