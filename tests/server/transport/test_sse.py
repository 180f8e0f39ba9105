"""`GET /v1/stream`: Server-Sent Events that resume exactly, bounded like a socket."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import h11
import orjson
import pytest

from events.model import Status
from server.protocol.auth import mint
from tests.conftest import Launch
from tests.restarting import Restartable
from tests.sse import EventSource, answer
from tests.waiting import eventually, eventually_async
from tests.wsclient import Client

SECRET = "sse-test-secret-of-at-least-32-bytes"


async def _create(url: str, input_: dict[str, Any], scope: str = "sse", token: str | None = None) -> str:
    client = await Client.open(url, token=token)
    try:
        ack = await client.request({"type": "create", "kind": "demo", "scope": scope, "input": input_})
        assert ack["type"] == "ack", ack
        return str(ack["task"])
    finally:
        await client.close()


async def test_a_stream_resumes_exactly_with_last_event_id_after_the_server_drops_it(
        server: Restartable) -> None:
    """The server restarts mid-task; the client reconnects with Last-Event-ID and gets every
    version after its snapshot exactly once, in order, up to the task's end."""
    task = await _create(server.ws_url, {"steps": 8, "step_ms": 400})
    source = EventSource(server.port, f"/v1/stream?channel=task:{task}&snapshot=true")
    versions: list[int] = []
    first: int | None = None
    restart: asyncio.Task[Any] | None = None
    async with asyncio.timeout(90):
        async for event in source.events():
            if event.name == "subscribed":
                data = event.json()
                if first is None:
                    first = data["tasks"][0]["version"] if data["tasks"] else 0
                assert event.id == data["position"]
                continue
            assert event.name == "message", event
            update = event.json()
            assert event.id == update["position"]
            versions.append(update["event"]["version"])
            if len(versions) == 3:
                restart = asyncio.create_task(server.restart())
            if Status(update["task"]["status"]).terminal:
                break
    assert restart is not None
    await restart
    assert source.connects >= 2, "the server's restart ended the first stream"
    assert first is not None
    assert versions == list(range(first + 1, first + 1 + len(versions))), versions


async def test_a_reader_that_stops_reading_is_told_to_resync_not_buffered(launch: Launch) -> None:
    """A stream whose reader stops reading is ended with a `resync` event at the last
    position written; the node holds at most its send buffer for it meanwhile."""
    node = await launch(send_buffer_bytes=16 * 1024)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", node.settings.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(b"GET /v1/stream?channel=scope:slow HTTP/1.1\r\nhost: x\r\n\r\n")
        url = f"ws://127.0.0.1:{node.settings.port}/ws"
        for _ in range(20):
            await _create(url, {"steps": 100, "step_ms": 0}, scope="slow")
        assert node.node is not None
        metrics = node.node.metrics
        await eventually(lambda: metrics.resyncs >= 1, within=60)
        data = b""
        async with asyncio.timeout(30):
            while not data.endswith(b"\r\n0\r\n\r\n"):  # the stream's end, after the resync
                data += await reader.read(65536)
    finally:
        writer.close()
    body = _unchunked(data)
    ids = [line[4:].decode() for line in body.split(b"\n") if line.startswith(b"id: ")]
    resync = next(block for block in body.split(b"\n\n") if b"event: resync" in block)
    position = orjson.loads(resync.split(b"data: ", 1)[1].split(b"\n")[0])["position"]
    assert ids[-1] == ids[-2] == position, "it resumes right after the last update written"


def _unchunked(data: bytes) -> bytes:
    """The body of a response as read off the wire (h11 undoes the chunked framing)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    body = b""
    while isinstance(event := conn.next_event(), h11.Response | h11.Data):
        if isinstance(event, h11.Data):
            body += event.data
    return body


@pytest.mark.parametrize(("path", "status", "code", "names"), [
    ("/v1/stream", 400, "bad_request", "channel"),
    ("/v1/stream?channel=nonsense", 400, "bad_request", "channel"),
    ("/v1/stream?channel=all&since=garbage", 400, "bad_request", "since"),
    ("/v1/stream?channel=all&snapshot=maybe", 400, "bad_request", "snapshot"),
    ("/v1/stream?channel=scope:theirs", 403, "forbidden", "theirs"),
])
async def test_a_stream_that_cannot_start_is_a_problem_naming_the_field(
        launch: Launch, path: str, status: int, code: str, names: str) -> None:
    """Bad parameters and scopes not granted are answered as the websocket would, as a
    problem body with the protocol's code, before any stream starts."""
    node = await launch(secret=SECRET, workers=0)
    got, body = await answer(node.settings.port, path, mint(SECRET, "me", ["mine:*"]))
    assert (got, body["code"]) == (status, code), body
    assert names in body["message"]


async def test_a_stream_needs_a_valid_token_and_hides_foreign_tasks(launch: Launch) -> None:
    """No token is 401 with WWW-Authenticate's scheme; another scope's task is 404, exactly
    like a task that does not exist; the query's access_token works as the header does."""
    node = await launch(secret=SECRET)
    port = node.settings.port
    url = f"ws://127.0.0.1:{port}/ws"
    theirs = await _create(url, {"steps": 1, "step_ms": 0}, scope="theirs",
                           token=mint(SECRET, "them", ["theirs"]))
    got, body = await answer(port, "/v1/stream?channel=all")
    assert (got, body["code"]) == (401, "unauthorized")
    mine = mint(SECRET, "me", ["mine"])
    foreign = await answer(port, f"/v1/stream?channel=task:{theirs}", mine)
    missing = await answer(port, "/v1/stream?channel=task:tsk_doesnotexist", mine)
    assert foreign[0] == missing[0] == 404
    assert foreign[1]["message"] == missing[1]["message"].replace("tsk_doesnotexist", theirs)
    token = mint(SECRET, "them", ["theirs"])
    source = EventSource(port, f"/v1/stream?channel=task:{theirs}&access_token={token}")
    async with asyncio.timeout(10):
        async for event in source.events(reconnect=False):
            assert event.name == "subscribed"
            break


async def test_an_idle_stream_sends_heartbeat_comments(launch: Launch) -> None:
    """Between updates the stream carries a comment every heartbeat_s (proxies keep it open)."""
    node = await launch(workers=0, heartbeat_s=0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", node.settings.port)
    try:
        writer.write(b"GET /v1/stream?channel=all HTTP/1.1\r\nhost: x\r\n\r\n")
        data = b""
        async with asyncio.timeout(10):
            while data.count(b": heartbeat") < 2:
                data += await reader.read(65536)
        assert data.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in data
    finally:
        writer.close()


async def test_a_stream_counts_against_its_principals_connections_until_it_ends(launch: Launch) -> None:
    """With one connection allowed, a second stream is 429 while the first is open, and
    the first's slot is free again once its reader leaves."""
    node = await launch(workers=0, max_connections_per_principal=1)
    port = node.settings.port
    first = EventSource(port, "/v1/stream?channel=all")
    events = first.events(reconnect=False)
    async with asyncio.timeout(10):
        assert (await anext(events)).name == "subscribed"
    got, body = await answer(port, "/v1/stream?channel=all")
    assert (got, body["code"]) == (429, "rate_limited")
    await events.aclose()  # the reader leaves

    async def admitted() -> bool:
        return node.node is not None and not node.node.services.admitted()

    await eventually_async(admitted)
    second = EventSource(port, "/v1/stream?channel=all").events(reconnect=False)
    try:
        async with asyncio.timeout(10):
            assert (await anext(second)).name == "subscribed"
    finally:
        await second.aclose()
