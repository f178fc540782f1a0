"""Reading a request body into a protocol model, refusing each kind of bad input with a 4xx.

The body is read by hand rather than through FastAPI's parameter injection so that every
failure has its own clear message: too large (413, decided from Content-Length before reading
and enforced while streaming, so a huge body never sits in memory), too slow (408 once the
body has taken ``body_timeout_s``: a client that sends half a body and stalls holds nothing for
long), not UTF-8, not JSON, and not the expected shape (400 naming the field). A client that
hangs up mid-upload is a client disconnect (counted as such), not a server error.
"""

import asyncio
from typing import Protocol, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from berth.runtime.server import errors
from berth.runtime.server.errors import APIError, from_validation_error, invalid_request

Model = TypeVar("Model", bound=BaseModel)

CLOSE = {"Connection": "close"}  # a stalled body is not read on: the connection cannot go on


class BodyLimits(Protocol):
    @property
    def max_body_bytes(self) -> int: ...
    @property
    def body_timeout_s(self) -> float: ...


def _too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"The request body is larger than the server's limit of {limit} bytes.",
        code="request_too_large",
    )  # no Connection: close: a client still sending would see a reset instead of the 413


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The raw body, at most ``limit`` bytes within ``timeout_s``; larger bodies are refused
    without buffering, slower ones with a 408."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise invalid_request("The Content-Length header is not a number.")
        if int(declared) > limit:
            raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise errors.body_timeout(timeout_s, size, CLOSE) from None
    except ClientDisconnect:
        raise errors.client_gone() from None
    return b"".join(chunks)


async def parse_body(request: Request, model: type[Model], limits: BodyLimits) -> Model:
    """The body validated as ``model``; raises :class:`APIError` (4xx) for any bad input."""
    raw = await read_body(request, limits.max_body_bytes, limits.body_timeout_s)
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
