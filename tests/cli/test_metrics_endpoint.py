"""The relay's and workers' metrics endpoint: HTTP/1.1 as Prometheus scrapes it, bounded."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import h11
import pytest

from cli.metrics_endpoint import MAX_CONNECTIONS, MAX_HEAD_BYTES, MetricsEndpoint
from tests.scraping import get
from tests.waiting import eventually_async

BODY = b"# TYPE up gauge\nup 1.0\n"


@pytest.fixture
async def endpoint() -> AsyncIterator[MetricsEndpoint]:
    async def render() -> bytes:
        return BODY

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    served = MetricsEndpoint(render, "127.0.0.1", port)
    await served.start()
    try:
        yield served
    finally:
        await served.stop(5)


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: h11.Connection,
                    method: str, path: str) -> tuple[int, bytes]:
    """One request on an open connection, read with h11: status and body."""
    writer.write(client.send(h11.Request(method=method, target=path, headers=[("host", "x")])) or b"")
    writer.write(client.send(h11.EndOfMessage()) or b"")
    status, body = 0, b""
    async with asyncio.timeout(10):
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                client.start_next_cycle()
                return status, body
            else:
                raise AssertionError(f"unexpected {event!r}")


async def _until_closed(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before it closed (a reset, when it closed with our bytes unread)."""
    try:
        async with asyncio.timeout(10):
            return await reader.read()
    except ConnectionResetError:
        return b""


async def test_scrapes_share_a_connection_and_other_requests_are_refused(endpoint: MetricsEndpoint) -> None:
    """GET and HEAD /metrics answer on one kept-alive connection; another path is 404,
    another method 405, and the connection still serves the next scrape."""
    reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
    client = h11.Connection(h11.CLIENT)
    try:
        assert await _exchange(reader, writer, client, "GET", "/metrics") == (200, BODY)
        assert await _exchange(reader, writer, client, "HEAD", "/metrics") == (200, b"")
        assert (await _exchange(reader, writer, client, "GET", "/"))[0] == 404
        assert (await _exchange(reader, writer, client, "DELETE", "/metrics"))[0] == 405
        assert await _exchange(reader, writer, client, "GET", "/metrics?x=1") == (200, BODY)
    finally:
        writer.close()


async def test_an_oversized_head_or_one_connection_too_many_is_closed_and_others_go_on(
        endpoint: MetricsEndpoint) -> None:
    """A request head past MAX_HEAD_BYTES ends its connection; past MAX_CONNECTIONS open at
    once, a new one is closed at once; either way the next scrape is served."""
    reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
    writer.write(b"GET /metrics HTTP/1.1\r\nx-big: " + b"a" * (2 * MAX_HEAD_BYTES))
    answer = await _until_closed(reader)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431")
    writer.close()
    idle = [await asyncio.open_connection("127.0.0.1", endpoint.port) for _ in range(MAX_CONNECTIONS)]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
        assert await _until_closed(reader) == b""
        writer.close()
        idle.pop()[1].close()

        async def served() -> bool:  # once the endpoint has seen that one close
            try:
                return await get(endpoint.port) == (200, BODY.decode())
            except ConnectionError:  # still refused (reset, or closed at once)
                return False

        await eventually_async(served)
    finally:
        for _, w in idle:
            w.close()

