"""`GET /metrics` of a relay or worker process, on a port of its own.

Served on the process's event loop (prometheus_client's `start_http_server` runs a thread
beside it, from which the scrape could not await its PostgreSQL reads), over HTTP/1.1 by
h11 (keep-alive, as Prometheus scrapes). Bounded: at most MAX_CONNECTIONS at once (one
more is closed at once), a request head of at most MAX_HEAD_BYTES, IDLE_S for a client to
send its next request; request bodies are never read (a request with one gets its answer,
then the connection is closed). A scrape's own reads have their deadlines (events/metrics.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import h11
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from events.aio import stop_tasks

log = logging.getLogger("taskcast.metrics")

MAX_CONNECTIONS = 16
MAX_HEAD_BYTES = 8 * 1024
IDLE_S = 10.0
READ_BYTES = 16 * 1024

Render = Callable[[], Awaitable[bytes]]


class MetricsEndpoint:
    """Answers `GET /metrics` on `host:port` with what `render` returns. `start`, then `stop`."""

    def __init__(self, render: Render, host: str, port: int) -> None:
        self.render = render
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen (raises OSError: the port is taken)."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                  limit=MAX_HEAD_BYTES)

    async def stop(self, timeout_s: float) -> None:
        """Stop listening, end every connection, wait (at most `timeout_s`) for the
        listener to close. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        await stop_tasks(list(self._connections), timeout_s, log)
        try:
            async with asyncio.timeout(timeout_s):
                await server.wait_closed()
        except TimeoutError:
            log.warning("the metrics listener on port %d did not close in time", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or len(self._connections) >= MAX_CONNECTIONS:
            writer.close()
            return
        self._connections.add(task)
        try:
            await self._requests(reader, writer)
        except (OSError, TimeoutError, h11.ProtocolError) as exc:
            log.debug("metrics connection ended: %r", exc)
        except Exception:  # one connection's problem; the endpoint goes on
            log.exception("metrics connection failed")
        finally:
            self._connections.discard(task)
            writer.close()

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        while True:
            try:
                event = await _next_event(conn, reader)
            except h11.RemoteProtocolError as exc:  # a bad or oversized head: say so, then close
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    writer.write(conn.send(h11.Response(status_code=exc.error_status_hint, headers=[
                        ("connection", "close"), ("content-length", "0")])) or b"")
                raise
            if not isinstance(event, h11.Request):
                return  # closed, or a client that has nothing more to say
            status, headers, body = await self._answer(event)
            headers = [*headers, ("content-length", str(len(body)))]
            out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
            if event.method != b"HEAD":
                out += conn.send(h11.Data(data=body)) or b""
            out += conn.send(h11.EndOfMessage()) or b""
            writer.write(out)
            async with asyncio.timeout(IDLE_S):
                await writer.drain()
            while conn.their_state is h11.SEND_BODY:  # a body: not read, so no keep-alive
                if conn.next_event() is h11.NEED_DATA:
                    return
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _answer(self, request: h11.Request) -> tuple[int, list[tuple[str, str]], bytes]:
        if request.target.partition(b"?")[0] != b"/metrics":
            return 404, [("content-type", "text/plain")], b"not found: try /metrics\n"
        if request.method not in (b"GET", b"HEAD"):
            return 405, [("allow", "GET, HEAD"), ("content-type", "text/plain")], b"method not allowed\n"
        try:
            body = await self.render()
        except Exception:
            log.exception("rendering the metrics failed")
            return 500, [("content-type", "text/plain")], b"internal error\n"
        return 200, [("content-type", CONTENT_TYPE_PLAIN_0_0_4)], body


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> object:
    """The next h11 event, reading (at most IDLE_S per read) as it needs."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        async with asyncio.timeout(IDLE_S):
            conn.receive_data(await reader.read(READ_BYTES))
