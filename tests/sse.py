"""A Server-Sent Events client as the WHATWG spec's EventSource behaves: it parses the stream,
remembers the last event id, and after the stream ends (or the server is gone) reconnects
after `retry` milliseconds sending `Last-Event-ID`. Read through h11's client side."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import h11
import orjson

DEADLINE_S = 10.0


@dataclass
class Event:
    name: str  # "message" for an event without `event:`
    data: str
    id: str | None

    def json(self) -> Any:
        return orjson.loads(self.data)


@dataclass
class EventSource:
    port: int
    path: str
    token: str | None = None
    last_event_id: str | None = None
    retry_ms: int = 1000
    connects: int = 0
    statuses: list[int] = field(default_factory=list)

    async def events(self, *, reconnect: bool = True) -> AsyncIterator[Event]:
        """Every event, across reconnects (stops at a non-200 answer, or after the first
        stream when `reconnect` is false)."""
        while True:
            try:
                async with aclosing(self._one_stream()) as stream:
                    async for event in stream:
                        yield event
            except (OSError, h11.ProtocolError):
                pass  # the server went away: like the end of the stream
            if not reconnect or (self.statuses and self.statuses[-1] != 200):
                return
            await asyncio.sleep(self.retry_ms / 1000)  # the spec's reconnection delay

    async def _one_stream(self) -> AsyncIterator[Event]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.connects += 1
        try:
            conn = h11.Connection(h11.CLIENT)
            headers = [("host", "127.0.0.1"), ("accept", "text/event-stream")]
            if self.token:
                headers.append(("authorization", f"Bearer {self.token}"))
            if self.last_event_id is not None:
                headers.append(("last-event-id", self.last_event_id))
            writer.write(conn.send(h11.Request(method="GET", target=self.path, headers=headers)) or b"")
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            buffer = b""
            fields: dict[str, str] = {}
            data: list[str] = []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    chunk = await reader.read(65536)
                    conn.receive_data(chunk)
                    continue
                if isinstance(event, h11.Response):
                    self.statuses.append(event.status_code)
                    if event.status_code != 200:
                        return
                elif isinstance(event, h11.Data):
                    buffer += event.data
                    *lines, rest = buffer.split(b"\n")
                    buffer = rest
                    for line in (raw.decode().rstrip("\r") for raw in lines):
                        if line == "":
                            if data:
                                if "id" in fields:
                                    self.last_event_id = fields["id"]
                                yield Event(fields.get("event", "message"), "\n".join(data),
                                            fields.get("id"))
                            elif "id" in fields:
                                self.last_event_id = fields["id"]
                            fields, data = {}, []
                        elif line.startswith(":"):
                            continue
                        else:
                            name, _, value = line.partition(":")
                            value = value[1:] if value.startswith(" ") else value
                            if name == "data":
                                data.append(value)
                            elif name == "retry" and value.isdigit():
                                self.retry_ms = int(value)
                            else:
                                fields[name] = value
                else:  # the end of the stream, or the connection
                    return
        finally:
            writer.close()


async def answer(port: int, path: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
    """One GET's status and JSON body (for a stream the server refuses)."""
    source = EventSource(port, path, token)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        conn = h11.Connection(h11.CLIENT)
        headers = [("host", "127.0.0.1")]
        if source.token:
            headers.append(("authorization", f"Bearer {source.token}"))
        writer.write(conn.send(h11.Request(method="GET", target=path, headers=headers)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        status, body = 0, b""
        async with asyncio.timeout(DEADLINE_S):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                else:
                    break
        return status, orjson.loads(body)
    finally:
        writer.close()
