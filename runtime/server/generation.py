"""Driving one admitted HTTP request to its response: collected, or streamed as SSE.

Both routes (completions, chat) share this: they differ only in how a choice's progress is
rendered, which a :class:`.renderer.Renderer` supplies. The driver owns the request's lifecycle rules:

- the per-request deadline (408 before the first byte, an SSE error event after it);
- a client that disconnects aborts its sequences, which frees their KV blocks at once;
- a streamed response starts only once the first update is in, so that a refusal or a timeout
  before the first token still gets a proper HTTP status instead of a broken stream.
"""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from berth.runtime.server import errors
from berth.runtime.server.engine_loop import EngineLoop, RequestStream, Update
from berth.runtime.server.errors import APIError
from berth.runtime.server.renderer import ChoiceProgress, Renderer

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"


def sse(payload: str) -> bytes:
    """One server-sent event carrying a JSON payload."""
    return b"data: " + payload.encode() + b"\n\n"


async def next_update(loop: EngineLoop, stream: RequestStream) -> Update:
    """The stream's next update; a timeout aborts the request and raises a 408 APIError."""
    try:
        update = await stream.next_update()
    except TimeoutError:
        loop.abort(stream, "timeout")
        error = errors.request_timeout(stream.timeout_s)
        error.counted = True  # the abort counted each sequence as a timeout
        raise error from None
    if update.error is not None:
        loop.abort(stream, "error")
        update.error.counted = True  # counted by the engine loop when it failed the sequence
        raise update.error
    return update


@contextlib.asynccontextmanager
async def abort_on_disconnect(
    request: Request, loop: EngineLoop, stream: RequestStream
) -> AsyncIterator[None]:
    """While inside, a client disconnect aborts ``stream`` (its updates then end it)."""

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                loop.abort(stream, "client_disconnect")
                return

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


async def respond(
    request: Request,
    loop: EngineLoop,
    stream: RequestStream,
    renderer: Renderer,
    streaming: bool,
    headers: dict[str, str],
) -> Response:
    """Run ``stream`` to its response; the caller has admitted it already."""
    choices = [ChoiceProgress(i) for i in range(len(stream.request_ids))]
    try:
        async with abort_on_disconnect(request, loop, stream):
            first = await next_update(loop, stream)
            choices[first.index].add(first)
            if not streaming:
                while not stream.done:
                    update = await next_update(loop, stream)
                    choices[update.index].add(update)
                return JSONResponse(renderer.response(choices), headers=headers)
    except BaseException:  # an error, or the server cancelling the handler at shutdown
        loop.abort(stream, "cancelled")
        raise
    body = _event_stream(loop, stream, renderer, choices, first)
    return StreamingResponse(
        body, media_type="text/event-stream", headers={**SSE_HEADERS, **headers}
    )


async def _event_stream(
    loop: EngineLoop,
    stream: RequestStream,
    renderer: Renderer,
    choices: list[ChoiceProgress],
    first: Update,
) -> AsyncIterator[bytes]:
    """The SSE body. Starlette cancels it when the client leaves; ``finally`` then aborts."""
    try:
        opening = [*renderer.opening_chunks(), *renderer.update_chunks(first, choices)]
        yield b"".join(map(sse, opening))
        while not stream.done:
            # Everything already queued leaves in one write: under load the event loop falls
            # behind the engine, and coalescing keeps its cost per step flat.
            events: list[bytes] = []
            try:
                while True:
                    update = await next_update(loop, stream)
                    choices[update.index].add(update)
                    events += map(sse, renderer.update_chunks(update, choices))
                    if stream.done or stream.queue.empty():
                        break
            except APIError as error:
                yield b"".join([*events, sse(json.dumps(error.body().model_dump())), DONE])
                return
            if events:
                yield b"".join(events)
        for chunk in renderer.closing_chunks(choices):
            yield sse(chunk)
        yield DONE
    finally:
        loop.abort(stream, "client_disconnect")
