"""One principal's frames cannot hurt another's: the findings of the edge review, one test
each (a second hello, refresh narrowing, poison events, amplification, outages, data
stored before the edge checked it)."""

from __future__ import annotations

import asyncio
import base64
import os
from typing import Any

import asyncpg
import orjson
from websockets.frames import Frame, Opcode

from cli.embedded import EmbeddedPostgres, restart_postgres
from cli.process import Process, Roles
from events.fold import MAX_COMPACT_BYTES
from events.ids import TaskId
from events.log import CreateTask
from events.relay.projector import Projector
from server.protocol.auth import mint
from server.settings import Settings
from tests.conftest import Launch, ws_url
from tests.waiting import eventually, eventually_async
from tests.wsclient import Client

SECRET = "a-secret-for-tests-that-is-32-bytes-long"


async def _raw_socket(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A websocket opened by hand, so the test controls what goes into each TCP write."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                 .encode())
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    assert b" 101 " in head.split(b"\r\n")[0], head
    return reader, writer


async def _read_until(reader: asyncio.StreamReader, *needles: bytes) -> bytes:
    data = b""
    async with asyncio.timeout(10):
        while not all(n in data for n in needles):
            chunk = await reader.read(65536)
            assert chunk, f"closed before {needles}: {data!r}"
            data += chunk
    return data


async def test_two_hellos_in_one_write_answer_bad_request_and_leak_no_admission(launch: Launch) -> None:
    """A second hello in the same TCP write is `bad_request`, not `internal`, and the
    principal's connection count is released exactly once when the socket ends, so such
    sockets never lock the principal out."""
    process = await launch(secret=SECRET, max_connections_per_principal=2, workers=0, relay=False)
    assert process.node is not None
    token = mint(SECRET, "twice", ["*"])
    hello = orjson.dumps({"type": "hello", "id": 1, "token": token})
    for _ in range(5):
        reader, writer = await _raw_socket(process.settings.port)
        writer.write(Frame(Opcode.TEXT, hello).serialize(mask=True) * 2)
        data = await _read_until(reader, b'"welcome"', b'"bad_request"')
        assert b'"internal"' not in data
        writer.close()
        await eventually(lambda: not process.node.services.admitted())  # type: ignore[union-attr]
    first = await Client.open(ws_url(process), token=token)
    second = await Client.open(ws_url(process), token=token)
    assert (await second.request({"type": "ping"}))["type"] == "pong"
    await first.close()
    await second.close()


async def test_refresh_to_a_narrower_token_drops_what_it_no_longer_grants(launch: Launch) -> None:
    """After `refresh` to a token without project:2, its `task:` and `scope:` subscriptions
    are dropped (named in the result) and `all` stops carrying it; project:1 still flows."""
    process = await launch(secret=SECRET)
    url = ws_url(process)
    admin = await Client.open(url, token=mint(SECRET, "admin", ["*"]))
    one = await Client.open(url, token=mint(SECRET, "u", ["project:1", "project:2"]))
    parked = await admin.request({"type": "create", "kind": "demo", "scope": "project:2",
                                  "input": {"steps": 1, "step_ms": 0, "ask_step": 1}})
    await admin.request({"type": "subscribe", "channel": f"task:{parked['task']}"})
    await admin.until(lambda f: f["type"] == "update" and f["event"]["type"] == "task.question")
    for channel in (f"task:{parked['task']}", "scope:project:2", "scope:project:1", "all"):
        assert (await one.request({"type": "subscribe", "channel": channel}))["type"] == "subscribed"
    refreshed = await one.request({"type": "refresh", "token": mint(SECRET, "u", ["project:1"])})
    assert sorted(refreshed["data"]["dropped"]) == sorted([f"task:{parked['task']}", "scope:project:2"])
    await admin.request({"type": "answer", "task": parked["task"], "question": "q_1", "answer": "approve"})
    mine = await admin.request({"type": "create", "kind": "demo", "scope": "project:1",
                                "input": {"steps": 1, "step_ms": 0}})
    await admin.until(lambda f: f["type"] == "update" and f["event"]["type"] == "task.completed"
                      and f["event"]["task"] == parked["task"], within=20)
    seen: list[dict[str, Any]] = []

    def done(frame: dict[str, Any]) -> bool:
        if frame["type"] == "update":
            seen.append(frame)
        return sum(1 for f in seen if f["event"]["task"] == mine["task"]
                   and f["event"]["type"] == "task.completed") == 2  # on scope:project:1 and all
    await one.until(done, within=20)
    assert all(f["task"]["scope"] == "project:1" for f in seen), [f["channel"] for f in seen]


async def test_a_poison_event_is_delivered_degraded_and_stops_nobody(launch: Launch,
                                                                     database_url: str) -> None:
    """An event that cannot be encoded (written before the edge existed, or by hand) is
    sent degraded, once, and counted; the relay keeps leading and every other task's
    events keep flowing, in order."""
    process = await launch(workers=1)
    assert process.relay is not None
    client = await Client.open(ws_url(process))
    await client.request({"type": "subscribe", "channel": "all"})
    poisoned = await client.request({"type": "create", "kind": "demo", "scope": "p:poison",
                                     "input": {"steps": 1, "step_ms": 0, "ask_step": 1}})
    await client.until(lambda f: f["type"] == "update" and f["event"]["type"] == "task.question")
    before = Projector.degraded_total
    view = await process.log.view(TaskId(poisoned["task"]))
    conn = await asyncpg.connect(database_url)
    try:  # an event whose data nests 300 levels: PostgreSQL stores it, orjson cannot encode it
        await conn.execute(
            "SELECT * FROM taskcast_append_batch(ARRAY[$1], ARRAY[$2::integer], ARRAY[$3],"
            " ARRAY[$4::text::jsonb], ARRAY[$2::integer + 1], ARRAY[now()], ARRAY[NULL::bigint], ARRAY[NULL],"
            " ARRAY[NULL::timestamptz], ARRAY[NULL], ARRAY[NULL], ARRAY[1], ARRAY[$2::integer + 1],"
            " ARRAY['task.cancel_requested'], ARRAY[(repeat('[', 300) || repeat(']', 300))::jsonb])",
            poisoned["task"], view["version"], view["status"],
            orjson.dumps({**view, "version": view["version"] + 1, "cancel_requested": True}).decode())
    finally:
        await conn.close()
    healthy = await client.request({"type": "create", "kind": "demo", "scope": "p:healthy",
                                     "input": {"steps": 2, "step_ms": 0}})
    updates: list[dict[str, Any]] = []

    def healthy_done(frame: dict[str, Any]) -> bool:
        if frame["type"] == "update":
            updates.append(frame)
        return frame["type"] == "update" and frame["event"]["task"] == healthy["task"] \
            and frame["event"]["type"] == "task.completed"
    await client.until(healthy_done, within=20)
    degraded = [u for u in updates if u["event"]["task"] == poisoned["task"]]
    assert [u["event"].get("degraded") for u in degraded] == [True]
    assert degraded[0]["event"]["version"] == view["version"] + 1 and degraded[0]["task"]["degraded"]
    versions = [u["event"]["version"] for u in updates if u["event"]["task"] == healthy["task"]]
    assert versions == list(range(1, len(versions) + 1))
    assert Projector.degraded_total > before and process.relay.leading.is_set()
    history = await client.request({"type": "history", "task": poisoned["task"]})
    assert history["type"] == "result" and history["data"]["events"][-1]["degraded"] is True


async def test_update_frames_do_not_grow_with_the_input_or_the_events(launch: Launch) -> None:
    """A 60 KB input is sent once (in `task.created`), not in every update, and no update's
    view passes MAX_COMPACT_BYTES however many steps the task has."""
    process = await launch(workers=1)
    client = await Client.open(ws_url(process))
    sizes: list[tuple[str, int, int]] = []

    async def follow(input_: dict[str, Any]) -> None:
        ack = await client.request({"type": "create", "kind": "demo", "scope": "p:big",
                                    "input": input_, "subscribe": True})
        assert ack["type"] == "ack", ack
        async with asyncio.timeout(60):
            while True:
                raw = await client.ws.recv()
                frame = orjson.loads(raw)
                if frame["type"] != "update":
                    continue
                sizes.append((frame["event"]["type"], len(raw), len(orjson.dumps(frame["task"]))))
                if frame["event"]["type"] == "task.completed":
                    return

    await follow({"steps": 10, "step_ms": 0, "pad": "x" * 60_000})
    created, rest = sizes[0], sizes[1:]
    assert created[0] == "task.created" and created[1] > 60_000
    assert sum(size for _, size, _ in rest) < 60_000, "the input was repeated"
    sizes.clear()
    await follow({"steps": 300, "step_ms": 0})
    assert len(sizes) > 600
    assert max(view for _, _, view in sizes) <= MAX_COMPACT_BYTES
    assert max(size for _, size, _ in sizes[1:]) <= MAX_COMPACT_BYTES + 2048


async def test_an_outage_mid_create_answers_unavailable_never_internal(
        own_postgres: EmbeddedPostgres, settings: Settings) -> None:
    """Creates in flight while PostgreSQL restarts each answer `ack` or `unavailable`
    (retryable), never `internal`; the node stays up."""
    async with Process(settings.with_(database_url=own_postgres.url), Roles(serve=True)) as process:
        client = await Client.open(ws_url(process))
        answers: list[dict[str, Any]] = []
        stop = asyncio.Event()

        async def fire() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                answers.append(await client.request(
                    {"type": "create", "kind": "demo", "scope": "p", "input": {}, "key": f"k{n}"}, within=40))

        firing = asyncio.create_task(fire())
        await eventually(lambda: len(answers) >= 20)
        await asyncio.to_thread(restart_postgres, own_postgres)
        count = len(answers)
        await eventually(lambda: len(answers) >= count + 20 and answers[-1]["type"] == "ack", within=40)
        stop.set()
        await asyncio.wait_for(firing, 40)
        codes = {a.get("code") for a in answers if a["type"] == "error"}
        assert codes <= {"unavailable"}, codes
        assert all(a["retryable"] for a in answers if a["type"] == "error")


async def test_a_worker_meeting_an_outage_mid_step_goes_on_under_its_fence(
        own_postgres: EmbeddedPostgres, settings: Settings) -> None:
    """PostgreSQL restarts while a step runs: the worker waits for it and carries on in the
    same attempt (no lease expiry, no step run twice), and the task completes."""
    s = settings.with_(database_url=own_postgres.url, lease_s=30.0)
    async with Process(s, Roles(serve=True, relay=True, workers=1)) as process:
        client = await Client.open(ws_url(process))
        ack = await client.request({"type": "create", "kind": "demo", "scope": "p",
                                    "input": {"steps": 3, "step_ms": 3000}, "subscribe": True})
        await client.until(lambda f: f["type"] == "update" and f["event"]["type"] == "step.started"
                           and f["event"]["data"]["step"] == "step_2", within=20)
        await asyncio.to_thread(restart_postgres, own_postgres)
        events: list[Any] = []

        async def completed() -> bool:
            try:
                events[:] = await process.log.history(TaskId(ack["task"]))
            except Exception:
                return False
            return any(e.type == "task.completed" for e in events)

        await eventually_async(completed, within=25, poll_s=0.2)  # well within the 30 s lease
        started = [e.data["step"] for e in events if e.type == "step.started"]
        assert started == ["step_1", "step_2", "step_3"], started
        assert [e.type for e in events].count("task.started") == 1


async def test_a_task_stored_with_a_huge_timeout_runs_and_kills_no_worker(launch: Launch) -> None:
    """A task stored with `timeout_s` 1e300 (before the edge refused it) neither crashes
    its runner nor the maintenance query of every worker: it runs, and so does the next."""
    process = await launch(workers=1)
    client = await Client.open(ws_url(process))
    await client.request({"type": "subscribe", "channel": "all"})
    ack = await process.log.create(CreateTask(kind="demo", scope="p", input={"steps": 1, "step_ms": 0},
                                              timeout_s=1e300))
    await client.until(lambda f: f["type"] == "update" and f["event"]["type"] == "task.completed"
                       and f["event"]["task"] == ack.task, within=20)
    await process.workers[0].maintain()  # the query that once raised DatetimeFieldOverflowError
    nxt = await client.request({"type": "create", "kind": "demo", "scope": "p", "input": {"steps": 1}})
    await client.until(lambda f: f["type"] == "update" and f["event"]["type"] == "task.completed"
                       and f["event"]["task"] == nxt["task"], within=20)
    assert all(not t.done() for t in process._tasks if t.get_name().startswith("worker"))


def test_serve_without_a_secret_refuses_a_public_host() -> None:
    """`taskcast serve --host 0.0.0.0` with no TASKCAST_SECRET exits 2 and says why, rather
    than let anyone on the network do anything."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TASKCAST_SECRET"}
    done = subprocess.run([sys.executable, "-m", "cli.main", "serve", "--host", "0.0.0.0", "--port", "0"],
                          env=env, capture_output=True, timeout=30, check=False)
    assert done.returncode == 2 and b"TASKCAST_SECRET" in done.stderr and b"--insecure" in done.stderr


async def test_a_forged_list_cursor_is_bad_request(launch: Launch) -> None:
    """A cursor crafted to smuggle a NUL (or a naive time) into the query is `bad_request`."""
    process = await launch(workers=0, relay=False)
    client = await Client.open(ws_url(process))
    for inner in (["2026-01-01T00:00:00+00:00", "tsk_\u0000"], ["2026-01-01T00:00:00", "tsk_a"], [1, 2]):
        cursor = base64.urlsafe_b64encode(orjson.dumps(inner)).decode()
        answer = await client.request({"type": "list", "cursor": cursor})
        assert answer["code"] == "bad_request" and "`cursor`" in answer["message"], answer


async def test_a_kinds_validator_refuses_its_input_before_the_ack(launch: Launch) -> None:
    """An input the kind can never run is `bad_request` naming the input's field, at once:
    no task is created."""
    process = await launch(workers=0, relay=False)
    client = await Client.open(ws_url(process))
    for bad in ({"steps": 5000}, {"steps": "three"}, {"step_ms": -1}):
        answer = await client.request({"type": "create", "kind": "demo", "scope": "p", "input": bad})
        assert answer["code"] == "bad_request" and "input." in answer["message"], answer
    assert (await client.request({"type": "list"}))["data"]["tasks"] == []
