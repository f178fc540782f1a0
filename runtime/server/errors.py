"""The server's error model: every failure leaves as OpenAI's error object with a 4xx/5xx status.

Handlers raise :class:`APIError` (or let Starlette/pydantic raise theirs); the exception
handlers installed by :func:`install_error_handlers` turn every one of them into
``{"error": {"message", "type", "param", "code"}}``. Bad input is always a 4xx; a 500 means a
bug or a broken engine, never a malformed request.
"""

import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from starlette.exceptions import HTTPException as StarletteHTTPException

from berth.runtime.server import protocol
from berth.runtime.server.protocol import ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"
TIMEOUT = "timeout_error"
UNAVAILABLE = "service_unavailable_error"
INTERNAL = "internal_error"


class APIError(Exception):
    """An error that reaches the client as an OpenAI error object with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}
        # True once the engine loop has counted this request's outcome in the metrics.
        self.counted = False

    def body(self) -> ErrorResponse:
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=detail)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400: the request is well-formed HTTP but its content is wrong."""
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str, served: str) -> APIError:
    return APIError(
        404,
        f"The model '{model}' does not exist; this server serves '{served}'.",
        type=INVALID_REQUEST,
        param="model",
        code="model_not_found",
    )


def queue_full(retry_after_s: int) -> APIError:
    return APIError(
        429,
        "The server's waiting queue is full; retry after the Retry-After interval.",
        type=RATE_LIMIT,
        code="queue_full",
        headers={"Retry-After": str(retry_after_s)},
    )


def request_timeout(timeout_s: float) -> APIError:
    return APIError(
        408,
        f"The request did not finish within the server's {timeout_s:g} s request timeout; "
        "ask for fewer tokens or raise --request-timeout.",
        type=TIMEOUT,
        code="request_timeout",
    )


def body_timeout(timeout_s: float, received: int, headers: dict[str, str]) -> APIError:
    return APIError(
        408,
        f"The request body did not arrive within the server's {timeout_s:g} s body timeout "
        f"({received} bytes received); send the whole body at once.",
        type=TIMEOUT,
        code="body_timeout",
        headers=headers,
    )


def client_gone() -> APIError:
    """The client hung up before its request was read: nobody gets this answer (499 is the
    status nginx logs for it); it is counted as a client disconnect, not a server error."""
    return APIError(499, "The client closed the connection.", code="client_disconnect")


def unavailable(message: str, code: str, retry_after_s: int) -> APIError:
    """A 503 for a server that cannot take work right now (loading, draining, engine failed)."""
    return APIError(
        503, message, type=UNAVAILABLE, code=code, headers={"Retry-After": str(retry_after_s)}
    )


# The protocol's model names: a union of models (``tool_choice``) puts the branch's name in loc.
_MODEL_NAMES = frozenset(
    name
    for name, value in vars(protocol).items()
    if isinstance(value, type) and issubclass(value, BaseModel)
)


def _param(error: ErrorDetails) -> str | None:
    """The dotted path of the offending field (``messages.0.role``), or None for the body."""
    loc = [str(part) for part in error["loc"] if part != "body"]
    # pydantic puts the union branch's type name into loc (``str``, ``list[int]``,
    # ``NamedToolChoice``); drop it.
    branches = {"str", "int", "float"} | _MODEL_NAMES
    loc = [part for part in loc if "[" not in part and part not in branches]
    return ".".join(loc) or None


def from_validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    """A 400 naming the first invalid field, the way OpenAI reports argument errors."""
    errors = exc.errors()
    if not errors:
        return invalid_request("The request body is invalid.")
    # Of a union's branches, the one that got furthest into the input says what is wrong
    # (a content part of an unknown type, rather than "content should be a string").
    first = max(errors, key=lambda error: len(error["loc"]))
    param = _param(first)
    if first["type"] == "extra_forbidden":
        return invalid_request(
            f"Unrecognized request argument supplied: {param}", param=param, code="unknown_argument"
        )
    if first["type"] == "json_invalid":
        return invalid_request(f"The body is not valid JSON: {first['msg']}", code="invalid_json")
    if first["type"] == "finite_number":
        return invalid_request(
            f"{param}: NaN and infinite numbers are not allowed; send a finite number.",
            param=param,
            code="invalid_value",
        )
    where = f"{param}: " if param else ""
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return invalid_request(f"{where}{first['msg']}{more}", param=param, code="invalid_value")


def install_error_handlers(app: FastAPI, on_error: Callable[[APIError], None]) -> None:
    """Route every exception to an OpenAI error body; ``on_error`` counts it for metrics."""

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        on_error(exc)
        return exc.response()

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ValidationError | RequestValidationError)
        error = from_validation_error(exc)
        on_error(error)
        return error.response()

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        kind = NOT_FOUND if exc.status_code == 404 else INVALID_REQUEST
        headers = dict(exc.headers) if exc.headers else None
        error = APIError(exc.status_code, str(exc.detail), type=kind, headers=headers)
        on_error(error)
        return error.response()

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error while serving a request", exc_info=exc)
        error = APIError(500, f"Internal server error: {type(exc).__name__}", type=INTERNAL)
        on_error(error)
        return error.response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
