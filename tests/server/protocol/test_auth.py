"""Auth: a principal acts on, reads and receives only the scopes its token grants."""

from __future__ import annotations

import asyncio
import time

import jwt
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from server.protocol.auth import mint
from tests.conftest import Launch, ws_url
from tests.wsclient import Client

SECRET = "a-secret-for-tests-that-is-32-bytes-long"


async def _close_code(client: Client) -> int | None:
    try:
        async with asyncio.timeout(10):
            while True:
                await client.ws.recv()
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None


async def test_a_socket_without_a_valid_token_is_closed_4401(launch: Launch) -> None:
    """With a secret: no token, a bad signature or an expired token close with 4401."""
    process = await launch(secret=SECRET, workers=0)
    expired = jwt.encode({"sub": "a", "scopes": ["*"], "exp": int(time.time()) - 10}, SECRET, "HS256")
    forged = mint("another-secret-of-32-bytes-or-more!!", "a", ["*"])
    for token in (None, "not-a-jwt", forged, expired):
        client = await Client.open(ws_url(process), hello=False)
        frame = {"type": "hello", "id": 1} | ({"token": token} if token else {})
        await client.send(frame)
        assert await _close_code(client) == 4401, token


async def test_a_token_granting_no_scope_is_closed_4403(launch: Launch) -> None:
    """A valid token that grants nothing is refused with 4403."""
    process = await launch(secret=SECRET, workers=0)
    client = await Client.open(ws_url(process), hello=False)
    await client.send({"type": "hello", "id": 1, "token": mint(SECRET, "nobody", [])})
    assert await _close_code(client) == 4403


async def test_project_1_can_neither_create_read_nor_receive_project_2(launch: Launch) -> None:
    """A token for project:1 cannot create in, get, list, read history of or subscribe to
    project:2, and never receives its events on `all`. Naming the scope is `forbidden`;
    naming a task of it answers exactly as a task that does not exist."""
    process = await launch(secret=SECRET)
    admin = await Client.open(ws_url(process), token=mint(SECRET, "admin", ["*"]))
    one = await Client.open(ws_url(process), token=mint(SECRET, "one", ["project:1"]))
    assert (await one.request({"type": "subscribe", "channel": "all"}))["type"] == "subscribed"

    other = await admin.request({"type": "create", "kind": "demo", "scope": "project:2",
                                 "input": {"steps": 1, "step_ms": 1}})
    mine = await one.request({"type": "create", "kind": "demo", "scope": "project:1",
                              "input": {"steps": 1, "step_ms": 1}})
    assert mine["type"] == "ack"
    for frame in ({"type": "create", "kind": "demo", "scope": "project:2", "input": {}},
                  {"type": "list", "scope": "project:2"},
                  {"type": "subscribe", "channel": "scope:project:2"}):
        assert (await one.request(frame))["code"] == "forbidden", frame
    missing = "tsk_" + "a" * 26
    for template in ({"type": "get"}, {"type": "history"}, {"type": "cancel"}, {"type": "retry"},
                     {"type": "answer", "question": "q_1", "answer": "yes"},
                     {"type": "subscribe", "channel": "task:{}"},
                     {"type": "create", "kind": "demo", "scope": "project:1", "input": {},
                      "depends_on": ["{}"]}):
        answers = []
        for task in (other["task"], missing):
            frame = {k: (v.replace("{}", task) if isinstance(v, str) else
                         [x.replace("{}", task) for x in v] if isinstance(v, list) else v)
                     for k, v in template.items()}
            frame.setdefault("task", task)
            if frame["type"] in ("subscribe", "create"):
                del frame["task"]
            error = await one.request(frame)
            answers.append((error["code"], error["message"].replace(task, "<task>")))
        assert answers[0] == answers[1] == ("not_found", "no task <task>"), (template, answers)

    listed = (await one.request({"type": "list"}))["data"]["tasks"]
    assert [t["id"] for t in listed] == [mine["task"]]
    # Both tasks run to completion; `all` carries only project:1's.
    seen: set[str] = set()

    def done(frame: dict[str, object]) -> bool:
        if frame["type"] == "update":
            event = frame["event"]
            assert isinstance(event, dict)
            seen.add(event["task"])
            return bool(event["type"] == "task.completed" and event["task"] == mine["task"])
        return False

    await one.until(done, within=20)
    await admin.request({"type": "subscribe", "channel": f"task:{other['task']}",
                         "since": other["position"]})
    await admin.until(lambda f: f["type"] == "update" and f["event"]["type"] == "task.completed")
    assert seen == {mine["task"]}


async def test_refresh_replaces_the_token_and_expiry_closes_4401(launch: Launch) -> None:
    """`refresh` swaps in a new token of the same principal; when a token expires on an open
    socket, the server closes it with 4401."""
    process = await launch(secret=SECRET, workers=0)
    client = await Client.open(ws_url(process), token=mint(SECRET, "a", ["*"], ttl_s=2))
    other = await client.request({"type": "refresh", "token": mint(SECRET, "b", ["*"])})
    assert other["code"] == "forbidden"
    renewed = await client.request({"type": "refresh", "token": mint(SECRET, "a", ["*"], ttl_s=3)})
    assert renewed["type"] == "result" and renewed["data"]["expires_at"] > time.time() + 2
    assert await _close_code(client) == 4401


async def test_browser_origins_are_checked_against_the_allowed_list(launch: Launch) -> None:
    """With allowed origins configured, a browser socket from another origin is refused."""
    process = await launch(secret=SECRET, allowed_origins=("https://app.example",), workers=0)
    try:
        async with connect(ws_url(process), origin="https://evil.example"):  # type: ignore[arg-type]
            raise AssertionError("a foreign origin was accepted")
    except InvalidStatus as refused:
        assert refused.response.status_code == 403
    async with connect(ws_url(process), origin="https://app.example") as ws:  # type: ignore[arg-type]
        await ws.send('{"type":"ping","id":1}')
        assert "pong" in str(await ws.recv())


async def test_connections_per_principal_are_limited(launch: Launch) -> None:
    """A principal over max_connections_per_principal is closed with 4429."""
    process = await launch(secret=SECRET, max_connections_per_principal=2, workers=0)
    token = mint(SECRET, "busy", ["*"])
    first = await Client.open(ws_url(process), token=token)
    await Client.open(ws_url(process), token=token)
    third = await Client.open(ws_url(process), hello=False)
    await third.send({"type": "hello", "id": 1, "token": token})
    assert await _close_code(third) == 4429
    await first.close()
    fourth = await Client.open(ws_url(process), token=token)  # a freed slot is reusable
    assert (await fourth.request({"type": "ping"}))["type"] == "pong"


def test_origins_are_the_servers_own_and_the_configured_ones_never_the_host() -> None:
    """The server's own origins and the configured ones may connect; an origin is never
    trusted for matching the request's Host (DNS rebinding), with or without a secret."""
    from server.protocol.auth import Auth

    own = ("http://127.0.0.1:8000", "https://tasks.example")
    for auth in (Auth(SECRET), Auth(None)):
        assert auth.origin_allowed("http://127.0.0.1:8000", own)
        assert auth.origin_allowed("HTTPS://tasks.example", own)
        assert not auth.origin_allowed("http://evil.example", own)
    assert Auth(SECRET, ("https://app.example/",)).origin_allowed("https://app.example", own)
    assert Auth(None, ("*",)).origin_allowed("http://anything.example", own)


async def test_an_origin_echoed_in_host_is_refused(launch: Launch) -> None:
    """`Origin: http://evil.example` with `Host: evil.example` (a rebinding page) gets 403,
    and the dashboard's own origin is served; also with no secret (development)."""
    for secret in (SECRET, None):
        process = await launch(secret=secret, workers=0, relay=False)
        port = process.settings.port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /ws HTTP/1.1\r\nHost: evil.example\r\nOrigin: http://evil.example\r\n"
                     b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        async with asyncio.timeout(5):
            status = await reader.readline()
        writer.close()
        assert b" 403 " in status, status
        async with connect(ws_url(process), origin=f"http://127.0.0.1:{port}") as ws:  # type: ignore[arg-type]
            await ws.send('{"type":"ping","id":1}')
            assert "pong" in str(await ws.recv())
