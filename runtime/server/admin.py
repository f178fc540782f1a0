"""``POST /admin/park`` and ``POST /admin/wake``: an operator parks or wakes the runtime by hand;
``POST /admin/rotation``: the autoscaler says whether the Service routes to this pod now.

Authenticated by a bearer token from the pod's Secret (env ``wire.ENV_ADMIN_TOKEN``, read once
into the settings): no credentials is 401 (with ``WWW-Authenticate: Bearer``); a wrong token,
or a server with no token configured, is 403. Each call waits, bounded by the standby policy's
deadlines, until the engine has reached the state asked for, and answers with the state: a park
returns once parked (or once the engine woke again for requests that came meanwhile); a wake
returns once active, or 503 with Retry-After when the memory could not be had in time. A
rotation call answers at once (``rotation.py``).
"""

import asyncio
import hmac
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, FastAPI
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from berth import wire
from berth.runtime.server import errors
from berth.runtime.server.errors import APIError
from berth.runtime.server.openapi import GENERATION_ERRORS, Responses
from berth.runtime.server.protocol import ErrorResponse
from berth.runtime.server.standby import ACTIVE, LOADING, PARKING, STANDBY

if TYPE_CHECKING:
    from berth.runtime.server.app import ModelServer

AUTHENTICATION = "authentication_error"
PERMISSION = "permission_error"
CONFLICT = "conflict_error"
WAIT_MARGIN_S = 10.0  # beyond the policy's deadline, how long an admin call waits for the engine

_bearer = HTTPBearer(auto_error=False, description=f"The token in {wire.ENV_ADMIN_TOKEN}.")

ADMIN_ERRORS: Responses = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in [
        (401, "No bearer token was sent."),
        (403, "The token is wrong, or the server has no admin token configured."),
        (409, "The runtime cannot do that now: still loading, or standby is off."),
        (503, "The engine failed, or (wake) it got no GPU memory in time; see Retry-After."),
    ]
}


class StandbyStatus(BaseModel):
    """The runtime's residency after an admin call."""

    state: str = Field(description="loading, active, parking, standby or waking")


class RotationChange(BaseModel):
    """Whether the pod's Service routes requests to it (its ``berth.dev/routed`` label)."""

    model_config = ConfigDict(extra="forbid")

    routed: bool = Field(description="false: every response closes its connection")


def check_token(credentials: HTTPAuthorizationCredentials | None, token: SecretStr | None) -> None:
    """Raise the 401/403 that the credentials deserve; return when they carry the token."""
    if credentials is None or not credentials.credentials:
        raise APIError(
            401,
            "This endpoint needs 'Authorization: Bearer <token>' with the runtime's admin token.",
            type=AUTHENTICATION,
            code="missing_token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if token is None:
        raise APIError(
            403,
            f"Admin endpoints are disabled: the server has no admin token (set "
            f"{wire.ENV_ADMIN_TOKEN}).",
            type=PERMISSION,
            code="admin_disabled",
        )
    given = credentials.credentials.encode()
    if not hmac.compare_digest(given, token.get_secret_value().encode()):
        raise APIError(403, "The admin token is wrong.", type=PERMISSION, code="invalid_token")


def install_admin_routes(app: FastAPI, server: "ModelServer") -> None:
    """Add the authenticated park, wake and rotation routes for ``server`` to ``app``."""

    def authorized(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        check_token(credentials, server.settings.admin_token)

    def ready_for_standby() -> None:
        retry = server.settings.retry_after_s
        failure = server.load_error or server.loop.failure
        if failure is not None:
            raise errors.unavailable(failure, "engine_failed", retry)
        if server.state is LOADING:
            raise APIError(409, "The model is still loading.", type=CONFLICT, code="loading")
        if not server.loop.standby.enabled:
            raise APIError(
                409,
                f"Warm standby is off for this runtime (set {wire.ENV_STANDBY_IDLE_SECONDS}, "
                "0 to park only when asked).",
                type=CONFLICT,
                code="standby_off",
            )

    async def wait_until(done: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not done() and time.monotonic() < deadline and server.loop.failure is None:
            await asyncio.sleep(0.01)

    @app.post(
        "/admin/park", dependencies=[Depends(authorized)], responses=ADMIN_ERRORS,
        tags=["admin"],
    )  # fmt: skip
    async def park() -> StandbyStatus:
        """Park: running requests finish (or are preempted at the deadline), then the weights
        and KV cache leave the GPU; the next request wakes the runtime."""
        ready_for_standby()
        loop = server.loop
        if loop.state in (ACTIVE, PARKING):
            seen = loop.entered[STANDBY]
            loop.park("an operator's request")
            await wait_until(
                lambda: loop.entered[STANDBY] > seen,
                loop.standby.park_deadline_s + WAIT_MARGIN_S,
            )
        return StandbyStatus(state=loop.state.value)

    @app.post(
        "/admin/wake", dependencies=[Depends(authorized)], responses=ADMIN_ERRORS,
        tags=["admin"],
    )  # fmt: skip
    async def wake() -> StandbyStatus:
        """Wake now: get the GPU memory back and copy the weights in, instead of at the next
        request."""
        ready_for_standby()
        loop = server.loop
        if loop.state is not ACTIVE:
            seen = loop.entered[STANDBY]
            loop.wake()
            await wait_until(
                lambda: (
                    loop.state is ACTIVE or (loop.state is STANDBY and loop.entered[STANDBY] > seen)
                ),
                loop.standby.wake_timeout_s + WAIT_MARGIN_S,
            )
        if loop.state is not ACTIVE:
            raise errors.unavailable(
                f"The runtime did not wake (it is {loop.state.value}); retry later.",
                "wake_failed",
                server.settings.retry_after_s,
            )
        return StandbyStatus(state=loop.state.value)

    @app.post(
        "/admin/rotation", dependencies=[Depends(authorized)],
        responses={400: GENERATION_ERRORS[400], 401: ADMIN_ERRORS[401], 403: ADMIN_ERRORS[403]},
        tags=["admin"],
    )  # fmt: skip
    async def rotation(change: RotationChange) -> RotationChange:
        """In or out of the Service's rotation, at once: out of it, every response closes its
        connection so that keep-alive clients reconnect to a routed replica (without this
        call the runtime learns it from its labels file, when the kubelet next rewrites it)."""
        server.rotation.tell(change.routed)
        return RotationChange(routed=not server.rotation.out())
