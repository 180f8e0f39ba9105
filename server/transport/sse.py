"""`GET /v1/stream`: one channel's updates as Server-Sent Events (PROTOCOL.md, HTTP API).

A stream is a subscription like a websocket's, run by the same code (server/handlers/
subscribe.py's `follow`, the hub, the catch-up from the log): what differs is only how
frames are written. Each update is an SSE event whose `id:` is its position, so a browser's
`EventSource` that reconnects sends `Last-Event-ID` and resumes exactly after the last
event it received; the `subscribed` event carries the position it starts from as its id,
so even a stream that ends before its first update resumes exactly.

Bounded like a socket (invariant 6): the events not yet written to the connection are held
up to `send_buffer_bytes`; an update that finds that full ends the stream with a `resync`
event whose id is the last position written, and the client's reconnect resumes there. A
stream counts against its principal's connection limit, ends when its token expires, and
sends a comment every `heartbeat_s` so proxies and the client can tell it is alive.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from events.errors import BadRequest, RateLimited, TaskcastError
from events.ids import Position, TaskId, encode
from events.ids import decode as decode_position
from server.handlers.subscribe import follow, parse_channel
from server.protocol.auth import Principal
from server.protocol.frames import MAX_SCOPE_CHARS, MAX_TASK_ID_CHARS
from server.protocol.session import Session, SessionState
from server.transport import wsframe

if TYPE_CHECKING:
    from server.fanout.hub import Subscription
    from server.services import Services

log = logging.getLogger("taskcast.sse")

HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}  # (nginx: do not buffer it)


class SseStream:
    """One stream, as the subscribe handler and the hub see a socket (session.Peer)."""

    def __init__(self, services: Services, principal: Principal) -> None:
        self.services = services
        self.session = Session(services, self)
        self.session.principal = principal
        self.session.state = SessionState.OPEN
        self.limit = services.settings.send_buffer_bytes
        self.chunks: list[bytes] = []
        self.size = 0
        self.ended = False
        self.wake = asyncio.Event()  # chunks to write, or the end
        self.room = asyncio.Event()  # the held events fell under a quarter of the limit
        self.room.set()

    # what the stream's generator reads

    def take(self) -> bytes:
        data, self.chunks, self.size = b"".join(self.chunks), [], 0
        self.room.set()
        return data

    # session.Peer

    def send(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "subscribed":
            self._event(b"subscribed", frame, frame.get("position"))
        elif kind == "error":
            self._event(b"error", frame)
            self.end()

    def writable(self) -> bool:
        return self.size < self.limit

    async def drained(self) -> None:
        await self.room.wait()

    def write_update(self, sub: Subscription, before: Position, frame: bytes) -> None:
        if self.ended:
            return
        if self.size >= self.limit:
            self.resync(sub, before)
            return
        self._append(b"id: %s\ndata: %s\n\n" % (encode(sub.cursor).encode(), wsframe.payload(frame)))

    def flush(self) -> None:
        self.wake.set()

    def resync(self, sub: Subscription, position: Position | None = None) -> None:
        """End the stream at the last position written: the reconnect resumes from there."""
        self.session.drop_subscription(sub)
        self.services.metrics.resyncs += 1
        resume = encode(sub.cursor if position is None else position)
        self._event(b"resync", {"type": "resync", "channel": sub.channel, "position": resume}, resume)
        self.end()

    def may_read(self, scope: str) -> bool:
        principal = self.session.principal
        return principal is not None and principal.may(scope)

    # writing

    def _event(self, name: bytes, data: dict[str, Any], id_: str | None = None) -> None:
        head = b"id: %s\n" % id_.encode() if id_ else b""
        self._append(head + b"event: %s\ndata: %s\n\n" % (name, orjson.dumps(data)))

    def _append(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk)
        if self.size >= self.limit // 4:
            self.room.clear()
        self.wake.set()

    def end(self) -> None:
        self.ended = True
        self.wake.set()

    def closed(self) -> None:
        self.ended = True
        self.session.closed()


async def stream(services: Services, principal: Principal, request: Request) -> Response:
    """The `GET /v1/stream` response (`principal`: the request's, already verified)."""
    channel, since, snapshot = _parameters(request)
    kind, name = parse_channel(channel)
    if kind == "task":
        principal.require_task(await services.log.view(TaskId(name)))  # 404 before 200
    elif kind == "scope":
        principal.require(name)
    if request.method == "HEAD":  # the headers a GET would have; no stream to hold open
        return Response(media_type="text/event-stream", headers=HEADERS)
    if not services.admit(principal.name):
        raise RateLimited("too many connections for this principal")
    sse = SseStream(services, principal)
    sse.session.admitted = principal.name  # released by sse.closed(), whichever way it ends
    return _Response(sse, _events(services, sse, channel, since, snapshot))


class _Response(StreamingResponse):
    """The stream's response; it closes the stream however the response ends, even one whose
    body never started (its generator's `finally` would not run then)."""

    def __init__(self, sse: SseStream, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=HEADERS)
        self.sse = sse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.sse.closed()


def _parameters(request: Request) -> tuple[str, Position | None, bool]:
    """`channel`, the position to resume after (`Last-Event-ID`, else `since`), `snapshot`."""
    query = request.query_params
    channel = query.get("channel")
    if not channel:
        raise BadRequest("`channel` is required: task:<id>, scope:<scope> or all")
    if len(channel) > MAX_TASK_ID_CHARS + MAX_SCOPE_CHARS:
        raise BadRequest(f"`channel` must be at most {MAX_TASK_ID_CHARS + MAX_SCOPE_CHARS} characters")
    resume = request.headers.get("last-event-id") or query.get("since")
    since = None
    if resume:
        try:
            since = decode_position(resume)
        except ValueError:
            field = "Last-Event-ID" if request.headers.get("last-event-id") else "since"
            raise BadRequest(f"`{field}` is not a position this server gave out") from None
    snapshot = query.get("snapshot", "false").lower()
    if snapshot not in ("true", "false", "1", "0"):
        raise BadRequest("`snapshot` must be true or false")
    return channel, since, snapshot in ("true", "1")


async def _events(services: Services, sse: SseStream, channel: str, since: Position | None,
                  snapshot: bool) -> AsyncIterator[bytes]:
    """The stream's bytes: what `follow` and the hub write to `sse`, heartbeats between."""
    principal = sse.session.principal
    assert principal is not None
    heartbeat = services.settings.heartbeat_s
    subscribing = asyncio.create_task(_follow(sse, channel, since, snapshot))
    try:
        yield b"retry: 1000\n\n"  # EventSource's reconnect delay
        while True:
            if sse.chunks:
                yield sse.take()
                continue
            if sse.ended:
                return
            left = math.inf if principal.expires_at is None else principal.expires_at - time.time()
            if left <= 0:
                sse.send({"type": "error", "code": "unauthorized", "message": "the token expired",
                          "retryable": False})
                continue
            sse.wake.clear()
            try:
                async with asyncio.timeout(min(heartbeat, left)):
                    await sse.wake.wait()
            except TimeoutError:
                yield b": heartbeat\n\n"
    finally:
        subscribing.cancel()
        sse.closed()


async def _follow(sse: SseStream, channel: str, since: Position | None, snapshot: bool) -> None:
    """Subscribe the stream; a failure (a task deleted since, the log unavailable) ends it
    with an `error` event."""
    try:
        await follow(sse.session, channel, since=since, snapshot=snapshot)
    except TaskcastError as exc:
        sse.send({"type": "error", "code": exc.code, "message": str(exc), "retryable": exc.retryable})
    except Exception:
        log.exception("subscribing an SSE stream to %s failed", channel)
        sse.services.metrics.internal_errors += 1
        sse.send({"type": "error", "code": "internal", "message": "internal error", "retryable": True})
