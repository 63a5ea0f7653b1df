"""Driving engine requests from the event loop: merging the event streams of a request's choices, and
cancelling them (freeing their KV blocks) when the client goes away, the deadline passes or the handler
ends for any other reason. Nothing here blocks on the engine thread: events arrive through each handle's
`aiter()`, which the engine thread feeds with loop.call_soon_threadsafe."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


async def merged_events(
    handles: Sequence[Any],
    on_event: Callable[[int, Any, float], None] | None = None,
    on_cancel: Callable[[int], None] | None = None,
    timeout: float | None = None,
) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, TokenEvent) of every handle as they arrive, until each has finished, or TimeoutError
    once `timeout` seconds have passed. However the iteration ends (done, cancelled, timed out, the generator
    closed), the unfinished requests are cancelled (and reported to `on_cancel`: their final event will never
    be read)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int, handle: Any) -> None:
        try:
            async for ev in handle.aiter():
                queue.put_nowait((i, ev))
        except Exception as e:  # surfaced in the consumer, which owns the response
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    unfinished = set(range(len(handles)))
    try:
        while unfinished:
            left = None if deadline is None else deadline - time.monotonic()
            try:  # wait_for rather than asyncio.timeout (3.11+), which a generator cannot hold across yields
                i, ev = await asyncio.wait_for(queue.get(), left)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                raise TimeoutError() from None
            if isinstance(ev, BaseException):
                raise ev
            if on_event is not None:
                on_event(i, ev, time.perf_counter())
            if ev.finished:
                unfinished.discard(i)
            yield i, ev
    finally:
        for i in unfinished:
            handles[i].cancel()  # thread-safe; the engine frees the blocks at its next step
            if on_cancel is not None:
                on_cancel(i)
        for t in tasks:
            t.cancel()


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client closes the connection (after the body was read, receive() waits for that)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


async def until_done(request: Request, work: Any, timeout: float) -> Any:
    """Await coroutine `work`, cancelling it if the client disconnects (ClientGone) or `timeout` seconds pass
    (TimeoutError). Cancelling it closes its merged_events, which cancels the engine requests."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task  # let its finally blocks (cancelling the engine requests) run before answering
    raise ClientGone() if watcher in done else TimeoutError()


class EventStream(StreamingResponse):
    """A `text/event-stream` response that stops (closing its body generator, which cancels the engine
    requests) as soon as the client disconnects, whatever ASGI version the server speaks.

    Starlette's StreamingResponse only notices a disconnect at the next write under ASGI 2.4 and leaves the
    generator to the garbage collector; a client that hangs up while its request waits in the queue would
    then hold its KV blocks until the generation ended."""

    def __init__(self, content: AsyncIterator[str], headers: dict[str, str] | None = None) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})}
        super().__init__(content, media_type="text/event-stream", headers=headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:

            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:
                    pass  # the connection broke mid-write: the same as a disconnect
                finally:
                    tg.cancel_scope.cancel()

            tg.start_soon(stream)
            await wait_for_disconnect(receive)
            tg.cancel_scope.cancel()

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()  # runs the generator's finally blocks now, not at garbage collection


def sse(data: str) -> str:
    """One Server-Sent Event carrying `data` (JSON without newlines), as OpenAI frames its stream."""
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"
