"""Plain HTTP/1.1 on one connection, by h11: keep-alive, request bodies, streamed responses.

The Connection hands a TCP connection here when its first request is not the websocket's
(`/ws`). Each request runs through the node's ASGI app (server/transport/http.py), one at a
time, in one task per connection. Bounded, so that no client holds more than its share:
- a head of at most MAX_HTTP_HEAD_BYTES (431), a body of at most `max_http_body_bytes`
  (413), read whole before the app runs (every body this server takes is a small JSON
  document);
- `http_idle_s` for the next request of a kept-alive connection, and for each read of a
  head or body once begun;
- reading pauses while a request is served (a pipelining client gets at most one head's
  worth buffered); writing waits for the send buffer to drain, at most SEND_DEADLINE_S, so a
  reader that stops reading stalls only its own response, then loses its connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import MutableMapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import h11

if TYPE_CHECKING:
    from server.services import Services
    from server.transport.connection import Connection

log = logging.getLogger("taskcast.http")

MAX_HTTP_HEAD_BYTES = 16 * 1024
SEND_DEADLINE_S = 30.0  # for the send buffer to drain below its low-water mark


class HttpChannel:
    """The HTTP side of one Connection: fed its bytes, serves its requests in `serve()`."""

    def __init__(self, conn: Connection, services: Services) -> None:
        assert conn.transport is not None
        self.conn = conn
        self.transport = conn.transport
        self.services = services
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HTTP_HEAD_BYTES)
        self.readable = asyncio.Event()
        self.gone = asyncio.Event()  # the client closed or the connection was lost
        self._eof = False

    # bytes in (from the Connection's protocol callbacks)

    def receive(self, data: bytes) -> None:
        self.h11.receive_data(data)
        self.readable.set()
        if len(self.h11.trailing_data[0]) > MAX_HTTP_HEAD_BYTES:
            self.transport.pause_reading()  # resumed when h11 needs more (`_next_event`)

    def eof(self) -> None:
        if not self._eof:
            self._eof = True
            self.h11.receive_data(b"")
        self.gone.set()
        self.readable.set()

    # requests

    async def serve(self) -> None:
        """Serve requests until the client or a limit ends the connection; then close it."""
        try:
            while await self._one():
                self.h11.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            self._refuse(exc.error_status_hint, str(exc))
        except (TimeoutError, ConnectionError, h11.LocalProtocolError) as exc:
            log.debug("HTTP connection ended: %r", exc)
        except Exception:
            log.exception("HTTP connection failed")
            self._refuse(500, "internal error")
        finally:
            self.transport.close()

    async def _one(self) -> bool:
        """Serve one request; whether the connection may carry another."""
        event = await self._next_event()
        if not isinstance(event, h11.Request):
            return False  # the client closed
        body = await self._body(event)
        if body is None:
            return False
        await self._run(event, body)
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    async def _next_event(self) -> Any:
        async with asyncio.timeout(self.services.settings.http_idle_s):
            while True:
                event = self.h11.next_event()
                if event is not h11.NEED_DATA:
                    return event
                if self._eof:
                    return h11.ConnectionClosed()
                self.readable.clear()
                self.transport.resume_reading()
                await self.readable.wait()

    async def _body(self, request: h11.Request) -> bytes | None:
        """The whole body, or None once a 413 was sent for one that is too large."""
        limit = self.services.settings.max_http_body_bytes
        declared = next((v for k, v in request.headers if k == b"content-length"), None)
        if declared is not None and int(declared) > limit:
            self._refuse(413, f"the body may have at most {limit} bytes")
            return None
        if self.h11.they_are_waiting_for_100_continue:
            self.transport.write(self.h11.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event()
            if isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            if not isinstance(event, h11.Data):
                return None  # closed mid-body
            size += len(event.data)
            if size > limit:
                self._refuse(413, f"the body may have at most {limit} bytes")
                return None
            chunks.append(bytes(event.data))

    async def _run(self, request: h11.Request, body: bytes) -> None:
        """Run the ASGI app for one request, writing its response as the app sends it."""
        assert self.services.http is not None
        raw_path, _, query = request.target.partition(b"?")
        settings = self.services.settings
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
                 "http_version": request.http_version.decode(), "method": request.method.decode(),
                 "scheme": "http", "path": unquote(raw_path.decode("latin-1")), "raw_path": raw_path,
                 "query_string": query, "root_path": "", "headers": list(request.headers),
                 "server": (settings.host, settings.port),
                 "client": self.transport.get_extra_info("peername")}
        head = request.method == b"HEAD"
        started: dict[str, Any] | None = None
        sent_body = False

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await self.gone.wait()  # a streaming response ends when its reader leaves
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            if self.gone.is_set():
                raise OSError("the client went away")
            if message["type"] == "http.response.start":
                started = dict(message)
                return
            if message["type"] != "http.response.body" or started is None:
                return
            out = b""
            if started.get("status") is not None:
                status = started.pop("status")
                out += self.h11.send(h11.Response(status_code=status, reason=_reason(status),
                                                  headers=started.get("headers", []))) or b""
            data = message.get("body", b"")
            if data and not head:
                out += self.h11.send(h11.Data(data=data)) or b""
            if not message.get("more_body", False):
                out += self.h11.send(h11.EndOfMessage()) or b""
            if out:
                self.transport.write(out)
                await self._drained()

        try:
            await self.services.http.app(scope, receive, send)
        except OSError as exc:  # the client left mid-response
            log.debug("%s %s: %r", request.method.decode(), raw_path.decode("latin-1"), exc)
            self.transport.abort()
            return
        except Exception:
            log.exception("%s %s failed", request.method.decode(), raw_path.decode("latin-1"))
            if started is None or "status" in started:
                self._refuse(500, "internal error")
            else:
                self.transport.abort()  # part of a response is out: the client must see it end
            return
        if self.h11.our_state is h11.SEND_RESPONSE:
            self._refuse(500, "internal error")  # the app answered nothing

    async def _drained(self) -> None:
        if not self.conn.writable():
            try:
                async with asyncio.timeout(SEND_DEADLINE_S):
                    await self.conn.drained()
            except TimeoutError:
                self.transport.abort()
                raise

    def _refuse(self, status: int, text: str) -> None:
        """Answer `status` with `text` and end the connection (when a response may still be
        sent: otherwise just end it)."""
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self.transport.abort()
            return
        body = (text + "\n").encode()
        out = self.h11.send(h11.Response(status_code=status, reason=_reason(status), headers=[
            ("content-type", "text/plain; charset=utf-8"), ("content-length", str(len(body))),
            ("connection", "close")])) or b""
        out += self.h11.send(h11.Data(data=body)) or b""
        out += self.h11.send(h11.EndOfMessage()) or b""
        self.transport.write(out)


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""
