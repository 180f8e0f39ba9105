"""One TCP connection: a websocket speaking PROTOCOL.md, or plain HTTP (server/transport/http11.py).

A thin asyncio shell around websockets' sans-I/O `ServerProtocol` (bytes in, frames out,
no await). An idle socket costs this object, the protocol's parser and the transport: no
task per connection. Requests that need I/O run as tasks, at most `max_inflight` at a time
(reading pauses beyond that).

Outgoing data goes straight to the transport. Its buffer is the socket's bounded send
queue (invariant 6): past `send_buffer_bytes` a fan-out update is not written, its
subscription gets `resync` instead; past `send_buffer_hard_bytes` the socket is closed 4429.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import orjson
from websockets.frames import Frame, Opcode
from websockets.http11 import Request as HttpRequest
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from events.errors import BadRequest, Internal, TaskcastError
from events.ids import Position, encode
from server.protocol.frames import FrameError, Request, decode
from server.protocol.session import Action, Close, Send, Session, error_frame
from server.transport import wsframe
from server.transport.http11 import MAX_HTTP_HEAD_BYTES, HttpChannel

if TYPE_CHECKING:
    from server.fanout.hub import Subscription
    from server.services import Services

log = logging.getLogger("taskcast.connection")

SUBPROTOCOL = Subprotocol("taskcast.v1")
CLOSE_TIMEOUT_S = 2.0
WRITE_GROUP_BYTES = 32 * 1024  # queued updates are written in groups of about this size


def _select_subprotocol(_: ServerProtocol, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    # PROTOCOL.md: selected when offered; a client that offers none is still served v1.
    return SUBPROTOCOL if SUBPROTOCOL in offered else None


class Connection(asyncio.Protocol):
    __slots__ = (
        "_drained",
        "closing",
        "fragments",
        "fragments_size",
        "head",
        "http",
        "inflight",
        "last_in",
        "last_out",
        "last_ping",
        "opened_at",
        "outbox",
        "reading_paused",
        "services",
        "session",
        "transport",
        "ws",
    )

    def __init__(self, services: Services) -> None:
        self.services = services
        self.transport: asyncio.Transport | None = None
        self.ws: ServerProtocol | None = None
        self.session: Session | None = None
        self.head = bytearray()
        self.http: HttpChannel | None = None  # plain HTTP, once the first request is not /ws
        self.fragments: list[bytes] | None = None
        self.fragments_size = 0
        self.inflight = 0
        self.reading_paused = False
        self.opened_at = self.last_in = self.last_out = self.last_ping = time.monotonic()
        self.closing = False
        self.outbox: list[tuple[Subscription, Position, bytes]] | None = None  # awaiting flush
        self._drained: asyncio.Event | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they have its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.services.transports.add(self.transport)
        settings = self.services.settings
        self.transport.set_write_buffer_limits(high=settings.send_buffer_bytes // 2,
                                          low=settings.send_buffer_bytes // 8)
        # The first request's head must be whole within http_idle_s (a client that trickles
        # it, or sends nothing, would otherwise hold the connection forever).
        asyncio.get_running_loop().call_later(settings.http_idle_s, self._head_overdue)

    def _head_overdue(self) -> None:
        if self.ws is None and self.http is None and self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.last_in = time.monotonic()
        if self.ws is None:
            self._receive_http(data)
            return
        self.ws.receive_data(data)
        self._process()

    def eof_received(self) -> bool | None:
        if self.http is not None:
            self.http.eof()
        if self.ws is not None:
            self.ws.receive_eof()
            self._process()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.services.transports.discard(self.transport)
        if self.session is not None:
            self.session.closed()
        if self.http is not None:
            self.http.eof()
        self.services.forget(self)
        if self._drained is not None:
            self._drained.set()

    def pause_writing(self) -> None:
        self._drained = asyncio.Event()

    def resume_writing(self) -> None:
        if self._drained is not None:
            self._drained.set()
            self._drained = None

    # HTTP, then the websocket handshake

    def _receive_http(self, data: bytes) -> None:
        """The first request's head decides: the websocket's (`/ws`), or plain HTTP."""
        assert self.transport is not None
        if self.http is not None:
            self.http.receive(data)
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > MAX_HTTP_HEAD_BYTES:
                self._http_error(431, b"request header too large")
            return
        request_line = bytes(self.head[:self.head.find(b"\r\n")])
        parts = request_line.split(b" ")
        if len(parts) == 3 and parts[1].split(b"?", 1)[0] == b"/ws":
            self._open_websocket()
            return
        self.http = HttpChannel(self, self.services)
        self.http.receive(bytes(self.head))
        self.head = bytearray()
        self.services.spawn(self.http.serve())

    def _http_error(self, status: int, text: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 %d Error\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, len(text), text))
        self.transport.close()

    def _open_websocket(self) -> None:
        settings = self.services.settings
        self.ws = ws = ServerProtocol(
            subprotocols=[SUBPROTOCOL], select_subprotocol=_select_subprotocol,
            max_size=settings.max_frame_bytes,
            origins=None)
        ws.receive_data(bytes(self.head))
        self.head = bytearray()
        events = ws.events_received()
        if not events or not isinstance(events[0], HttpRequest):
            self._flush()
            return
        request = events[0]
        origin = request.headers.get("Origin")
        if origin is not None and not self.services.origin_allowed(origin):
            response = ws.reject(403, "origin not allowed\n")
        else:
            response = ws.accept(request)
        ws.send_response(response)
        self._flush()
        if ws.state is State.OPEN:

            self.session = Session(self.services, self, now=time.monotonic())
            self.services.connections.add(self)
            self.opened_at = time.monotonic()

    # websocket frames in

    def _process(self) -> None:
        assert self.ws is not None
        for event in self.ws.events_received():
            if not isinstance(event, Frame):
                continue
            opcode = event.opcode
            if opcode is Opcode.TEXT:
                if event.fin:
                    self._message(bytes(event.data))
                else:
                    self.fragments, self.fragments_size = [bytes(event.data)], len(event.data)
            elif opcode is Opcode.CONT and self.fragments is not None:
                self.fragments.append(bytes(event.data))
                if event.fin:
                    data, self.fragments = b"".join(self.fragments), None
                    self._message(data)
            elif opcode is Opcode.BINARY:
                self.send(error_frame(None, BadRequest("binary messages are not part of the protocol; "
                                                       "send JSON text")))
            elif opcode is Opcode.CONT and self.fragments is None:
                pass  # the continuation of a binary message
        self._flush()

    def _message(self, data: bytes) -> None:
        assert self.session is not None
        try:
            request = decode(data, self.services.frame_limits)
        except FrameError as exc:
            self._act(self.session.refuse(exc))
            return
        try:
            self._act(self.session.receive(request, time.monotonic()))
        except Exception:  # a bug met by one frame ends this socket, never the node
            log.exception("handling a %s frame failed; closing the socket", request.type)
            self.services.metrics.internal_errors += 1
            self.close(4500, "internal error")

    def _act(self, actions: list[Action]) -> None:
        """Carry out what the session decided."""
        for action in actions:
            if isinstance(action, Send):
                self.send(action.frame)
            elif isinstance(action, Close):
                self.close(action.code, action.reason)
            else:
                self.request_started()
                self.services.spawn(self._run(action.request))

    async def _run(self, request: Request) -> None:
        """Run a request's handler; send its answer, or its error, with the request's id."""
        assert self.session is not None
        try:
            answer = await self.services.handlers[request.type](self.session, request)
            if answer is not None:
                self.send(answer)
        except TaskcastError as exc:
            self.send(error_frame(request.id, exc))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed", request.type)
            self.services.metrics.internal_errors += 1
            self.send(error_frame(request.id, Internal("internal error")))
        finally:
            self.request_done()

    # frames out

    def _flush(self) -> None:
        assert self.ws is not None and self.transport is not None
        for chunk in self.ws.data_to_send():
            if chunk:
                self.transport.write(chunk)
            else:
                self.transport.close()  # end of stream: written data is flushed first

    @property
    def open(self) -> bool:
        return self.ws is not None and self.ws.state is State.OPEN and not self.closing

    def send(self, frame: dict[str, Any]) -> None:
        """Write one frame (an answer, an error): encoded, framed, written now."""
        if self.open:
            assert self.transport is not None
            if self.outbox:
                self.flush()  # updates queued before this frame go out before it
            self.transport.write(wsframe.text(orjson.dumps(frame)))
            self.services.metrics.frames_out += 1
            self.last_out = time.monotonic()

    def write_update(self, sub: Subscription, before: Position, frame: bytes) -> None:
        """Queue a pre-framed update (`before`: the subscription's position without it); the
        hub flushes each socket's queue with one write after routing a batch, so a socket
        costs one syscall per batch, not one per update."""
        if self.closing:
            return
        if self.outbox is None:
            self.outbox = []
            self.services.hub.mark_dirty(self)
        self.outbox.append((sub, before, frame))

    def flush(self) -> None:
        """Write the queued updates while the send buffer has room. A subscription whose next
        update finds it full is stopped with `resync` at the last position it was sent."""
        outbox, self.outbox = self.outbox, None
        if not outbox or not self.open:  # (checked once per batch: `open` is not cheap)
            return
        transport = self.transport
        assert transport is not None
        limit = self.services.settings.send_buffer_bytes
        group: list[bytes] = []
        group_bytes = 0
        stopped: dict[Subscription, Position] = {}
        for sub, before, frame in outbox:
            if sub in stopped or not sub.active:
                continue
            # The kernel takes what it can at each write; only what it refuses stays in the
            # transport's buffer. That buffer is checked before each group is started.
            if not group and transport.get_write_buffer_size() >= limit:
                stopped[sub] = before
                continue
            group.append(frame)
            group_bytes += len(frame)
            if group_bytes >= WRITE_GROUP_BYTES:
                self._write_group(group)
                group, group_bytes = [], 0
        if group:
            self._write_group(group)
        for sub, position in stopped.items():
            self.resync(sub, position)

    def _write_group(self, frames: list[bytes]) -> None:
        assert self.transport is not None
        self.transport.write(frames[0] if len(frames) == 1 else b"".join(frames))
        self.services.metrics.frames_out += len(frames)
        self.last_out = time.monotonic()

    def resync(self, sub: Subscription, position: Position | None = None) -> None:
        """Stop a subscription that cannot stay gap-free; tell the client where to resume
        (the last position it was sent; by default the subscription's cursor)."""
        assert self.session is not None
        self.session.drop_subscription(sub)
        self.services.metrics.resyncs += 1
        assert self.transport is not None
        if self.transport.get_write_buffer_size() >= self.services.settings.send_buffer_hard_bytes:
            self.close(4429, "reader too slow")
            return
        resume = sub.cursor if position is None else position
        self.send({"type": "resync", "channel": sub.channel, "position": encode(resume)})

    def may_read(self, scope: str) -> bool:
        """Whether this socket's principal may receive events of `scope`."""
        principal = self.session.principal if self.session is not None else None
        return principal is not None and principal.may(scope)

    def writable(self) -> bool:
        """Whether the send buffer has room (below the resync threshold)."""
        return (self.transport is not None
                and self.transport.get_write_buffer_size() < self.services.settings.send_buffer_bytes)

    async def drained(self) -> None:
        """Wait until the send buffer is back under its low-water mark."""
        if self._drained is not None:
            await self._drained.wait()

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake; abort if the peer does not answer in time."""
        if self.ws is None or self.closing:
            return
        self.closing = True
        if self.ws.state is State.OPEN:
            self.ws.send_close(code, reason)
            self._flush()
        # The peer answers our close frame and the connection ends; if it does not, abort.
        if self.transport is not None:
            asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_S, self.transport.abort)

    # flow control for requests

    def request_started(self) -> None:
        self.inflight += 1
        if self.inflight >= self.services.settings.max_inflight and not self.reading_paused:
            assert self.transport is not None
            self.transport.pause_reading()
            self.reading_paused = True

    def request_done(self) -> None:
        self.inflight -= 1
        if self.reading_paused and self.inflight < self.services.settings.max_inflight // 2:
            assert self.transport is not None
            self.reading_paused = False
            self.transport.resume_reading()
