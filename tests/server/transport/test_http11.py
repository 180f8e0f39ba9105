"""Plain HTTP/1.1 as clients and proxies speak it: keep-alive, pipelining, bodies, limits."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import h11

from tests.conftest import Launch

DEADLINE_S = 10.0


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


class HttpClient:
    """One TCP connection, read through h11's client side (so framing is checked too)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, port: int) -> HttpClient:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def request(self, method: str, path: str, *, body: bytes | None = None,
                headers: list[tuple[str, str]] | None = None, write: bool = True) -> bytes:
        """Send a request (`write` False: only its bytes, for the caller to send)."""
        out = b""
        headers = [("host", "127.0.0.1"), *(headers or [])]
        if body is not None and not any(k == "transfer-encoding" for k, _ in headers):
            headers.append(("content-length", str(len(body))))
        out += self.h11.send(h11.Request(method=method, target=path, headers=headers)) or b""
        if body:
            out += self.h11.send(h11.Data(data=body)) or b""
        out += self.h11.send(h11.EndOfMessage()) or b""
        if write:
            self.writer.write(out)
        return out

    async def answer(self) -> Answer:
        """The next response, whole."""
        async with asyncio.timeout(DEADLINE_S):
            response: h11.Response | None = None
            body = b""
            while True:
                event = self.h11.next_event()
                if event is h11.NEED_DATA:
                    self.h11.receive_data(await self.reader.read(65536))
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert response is not None
                    if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                        self.h11.start_next_cycle()
                    return Answer(response.status_code, dict(response.headers), body)
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionError("closed before a whole response")

    async def closed(self) -> bool:
        """Whether the server closes the connection (within the deadline)."""
        async with asyncio.timeout(DEADLINE_S):
            while await self.reader.read(65536):
                pass
        return True

    def close(self) -> None:
        self.writer.close()


async def test_a_kept_alive_connection_serves_request_after_request(launch: Launch) -> None:
    """Two requests, one connection: both answered, the connection kept open between them."""
    node = await launch(workers=0)
    client = await HttpClient.open(node.settings.port)
    try:
        for _ in range(2):
            client.request("GET", "/healthz")
            answer = await client.answer()
            assert answer.status == 200 and b'"ok"' in answer.body
    finally:
        client.close()


async def test_pipelined_requests_are_answered_in_order(launch: Launch) -> None:
    """Requests sent in one write get their answers in the order they were sent."""
    node = await launch(workers=0)
    client = await HttpClient.open(node.settings.port)
    try:
        requests = [("GET", "/healthz"), ("GET", "/no-such-page"), ("HEAD", "/healthz")]
        client.writer.write(b"".join(HttpClient(client.reader, client.writer).request(m, p, write=False)
                                     for m, p in requests))
        statuses = []
        for method, path in requests:  # (h11's client side does not pipeline: one at a time)
            client.request(method, path, write=False)
            statuses.append(await client.answer())
        assert [a.status for a in statuses] == [200, 404, 200]
        assert statuses[2].body == b"", "a HEAD answer has no body"
    finally:
        client.close()


async def test_a_body_over_the_limit_is_refused_413_and_the_connection_closed(launch: Launch) -> None:
    """Declared or chunked, a body larger than TASKCAST_MAX_HTTP_BODY_BYTES is refused, unread."""
    node = await launch(workers=0, max_http_body_bytes=1000)
    for headers in ([], [("transfer-encoding", "chunked")]):
        client = await HttpClient.open(node.settings.port)
        try:
            client.request("POST", "/healthz", body=b"x" * 5000, headers=headers)
            answer = await client.answer()
            assert answer.status == 413 and b"1000" in answer.body
            assert await client.closed()
        finally:
            client.close()


async def test_an_idle_connection_and_an_unfinished_head_are_closed(launch: Launch) -> None:
    """A kept-alive connection with no next request, and a head that never ends, are closed
    after TASKCAST_HTTP_IDLE_S: neither holds the node's resources."""
    node = await launch(workers=0, http_idle_s=0.3)
    idle = await HttpClient.open(node.settings.port)
    slow = await HttpClient.open(node.settings.port)
    try:
        idle.request("GET", "/healthz")
        assert (await idle.answer()).status == 200
        slow.writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")  # no blank line, ever
        await slow.writer.drain()
        slow.writer.write(b"x-more: 1\r\n")  # (the first request's head is complete only at \r\n\r\n)
        assert await idle.closed()
        assert await slow.closed()
    finally:
        idle.close()
        slow.close()


async def test_a_request_h11_cannot_parse_is_answered_400(launch: Launch) -> None:
    """A malformed header line gets 400 and a closed connection, and the node goes on."""
    node = await launch(workers=0)
    reader, writer = await asyncio.open_connection("127.0.0.1", node.settings.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\nno colon here\r\n\r\n")
        async with asyncio.timeout(DEADLINE_S):
            data = await reader.read()
        assert data.startswith(b"HTTP/1.1 400 ")
    finally:
        writer.close()
    client = await HttpClient.open(node.settings.port)
    try:
        client.request("GET", "/healthz")
        assert (await client.answer()).status == 200
    finally:
        client.close()
