"""The gateway under stress: resume, racing snapshots, slow readers, a database outage,
readiness, and fuzzed frames on a live socket."""

from __future__ import annotations

import asyncio
import json
import socket
from collections import defaultdict
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from cli.embedded import EmbeddedPostgres, restart_postgres, stop_postgres
from cli.process import Process, Roles
from server.settings import Settings
from tests.conftest import Launch, on_both_engines, ws_url
from tests.scraping import get
from tests.waiting import eventually_async
from tests.wsclient import Client


def _versions(updates: list[dict[str, Any]]) -> dict[str, list[int]]:
    by_task: dict[str, list[int]] = defaultdict(list)
    for u in updates:
        by_task[u["event"]["task"]].append(u["event"]["version"])
    return by_task


@on_both_engines
async def test_a_client_resumes_with_its_last_position_and_misses_nothing(taskcast: Process) -> None:
    """Disconnect mid-task, re-subscribe with the last position: exactly the missed events,
    then live ones, none twice."""
    client = await Client.open(ws_url(taskcast))
    ack = await client.request({"type": "create", "kind": "demo", "scope": "p", "subscribe": True,
                                "input": {"steps": 6, "step_ms": 60}})
    first = [await client.until(lambda f: f["type"] == "update") for _ in range(4)]
    await client.close()

    async def moved_on() -> bool:  # the task moves on while nobody watches
        return len(await taskcast.log.history(ack["task"])) > len(first) + 2

    await eventually_async(moved_on, within=10, poll_s=0.02)

    again = await Client.open(ws_url(taskcast))
    sub = await again.request({"type": "subscribe", "channel": f"task:{ack['task']}",
                               "since": first[-1]["position"]})
    assert sub["recovered"] is True
    rest: list[dict[str, Any]] = []
    while not rest or rest[-1]["event"]["type"] != "task.completed":
        rest.append(await again.until(lambda f: f["type"] == "update"))
    versions = [u["event"]["version"] for u in first + rest]
    assert versions == list(range(1, len(versions) + 1))


@on_both_engines
async def test_a_snapshot_racing_updates_loses_none_and_repeats_none(taskcast: Process) -> None:
    """Subscribing with a snapshot while 8 tasks update fast: for each task, the live versions
    continue the snapshot's exactly."""
    client = await Client.open(ws_url(taskcast))
    tasks = [(await client.request({"type": "create", "kind": "demo", "scope": "p:race",
                                    "input": {"steps": 10, "step_ms": 4}}))["task"] for _ in range(8)]
    watcher = await Client.open(ws_url(taskcast))
    sub = await watcher.request({"type": "subscribe", "channel": "scope:p:race", "snapshot": True})
    start = {view["id"]: view["version"] for view in sub["tasks"]}
    assert set(start) == set(tasks)
    done: set[str] = set()
    updates: list[dict[str, Any]] = []

    def record(frame: dict[str, Any]) -> bool:
        if frame["type"] == "update":
            updates.append(frame)
            if frame["event"]["type"] == "task.completed":
                done.add(frame["event"]["task"])
        return done | {t for t, v in start.items() if v >= 26} >= set(tasks)

    if not all(v >= 26 for v in start.values()):
        await watcher.until(record, within=30)
    for task, versions in _versions(updates).items():
        assert versions == list(range(start[task] + 1, start[task] + 1 + len(versions))), task


async def test_a_slow_reader_is_resynced_or_closed_and_fast_sockets_get_everything(launch: Launch) -> None:
    """One socket stops reading while 100 others keep up: its send buffer stays bounded (it
    gets resync or 4429), and every fast socket still receives every update."""
    process = await launch(send_buffer_bytes=16 * 1024, send_buffer_hard_bytes=64 * 1024)
    assert process.node is not None
    url = ws_url(process)
    fast = [await Client.open(url) for _ in range(100)]
    for client in fast:
        await client.request({"type": "subscribe", "channel": "scope:p:busy"})
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", process.settings.port))
    slow = await connect(url, sock=raw, compression=None, max_queue=1)
    await slow.send('{"type":"hello","id":1}')
    await slow.recv()
    await slow.send('{"type":"subscribe","id":2,"channel":"scope:p:flood"}')
    await slow.recv()
    slow.transport.pause_reading()  # it stops reading

    creator = await Client.open(url)
    # Big views (32 labels of 100 chars, repeated in every update): the buffers fill fast.
    labels = [f"{i:02d}" + "x" * 98 for i in range(32)]
    for _ in range(10):
        await creator.request({"type": "create", "kind": "demo", "scope": "p:flood",
                               "input": {"steps": 60, "step_ms": 0}, "labels": labels})
    tasks = [(await creator.request({"type": "create", "kind": "demo", "scope": "p:busy",
                                     "input": {"steps": 10, "step_ms": 0}}))["task"] for _ in range(20)]
    peak = 0

    async def watch_buffers() -> None:
        nonlocal peak
        while True:
            peak = max([peak, *(t.get_write_buffer_size() for t in process.node.services.transports)])  # type: ignore[union-attr]
            await asyncio.sleep(0.005)

    watching = asyncio.create_task(watch_buffers())
    try:
        for client in fast:
            completed: set[str] = set()

            def finished(frame: dict[str, Any], completed: set[str] = completed) -> bool:
                if frame["type"] == "update" and frame["event"]["type"] == "task.completed":
                    completed.add(frame["event"]["task"])
                return completed == set(tasks)

            await client.until(finished, within=60)
    finally:
        watching.cancel()
    # Writing stops once the buffer holds send_buffer_bytes (one frame may overshoot), and a
    # socket past send_buffer_hard_bytes is closed: the peak is bounded by both.
    assert peak <= process.settings.send_buffer_hard_bytes + 32 * 1024 + 17 * 1024
    assert process.node.metrics.resyncs >= 1
    slow.transport.resume_reading()
    frames: list[str] = []
    try:
        async with asyncio.timeout(10):
            async for message in slow:
                frames.append(str(message))
                if '"resync"' in frames[-1]:
                    break
    except ConnectionClosed as closed:
        assert closed.rcvd is not None and closed.rcvd.code == 4429
    else:
        assert '"channel":"scope:p:flood"' in frames[-1]


async def test_postgres_down_answers_unavailable_and_serving_resumes(
        own_postgres: EmbeddedPostgres, settings: Settings) -> None:
    """With PostgreSQL stopped, commands answer `unavailable` (retryable, no ack) and the node
    stays up; once it is back, the same command with the same key succeeds, once."""
    async with Process(settings.with_(database_url=own_postgres.url),
                       Roles(serve=True, relay=True)) as process:
        client = await Client.open(ws_url(process))
        frame = {"type": "create", "kind": "demo", "scope": "p", "input": {"steps": 0}, "key": "k"}
        await asyncio.to_thread(stop_postgres, own_postgres)
        error = await client.request(frame)
        assert error["type"] == "error" and error["code"] == "unavailable" and error["retryable"]
        assert (await client.request({"type": "ping"}))["type"] == "pong"
        await asyncio.to_thread(restart_postgres, own_postgres)
        acks: list[dict[str, Any]] = []

        async def retried() -> bool:
            answer = await client.request(frame)
            if answer["type"] == "ack":
                acks.append(answer)
            return bool(acks)

        await eventually_async(retried, within=30, poll_s=0.2)
        again = await client.request(frame)
        assert again["duplicate"] is True and again["task"] == acks[0]["task"]


async def test_readyz_is_green_only_while_relay_messages_arrive(taskcast: Process) -> None:
    """/readyz needs PostgreSQL and messages actually flowing from the relay through Redis;
    /healthz and /metrics answer."""
    port = taskcast.settings.port

    async def ready() -> bool:
        return (await get(port, "/readyz"))[0] == 200

    await eventually_async(ready)
    assert (await get(port, "/healthz"))[0] == 200
    status, metrics = await get(port, "/metrics")
    assert status == 200 and "taskcast_connections" in metrics and "taskcast_ack_seconds_bucket" in metrics
    assert taskcast.relay is not None
    for task in taskcast._tasks:
        if task.get_name() == "relay":
            task.cancel()
    async def not_ready() -> bool:
        return not await ready()

    await eventually_async(not_ready)
    status, body = await get(port, "/readyz")
    assert status == 503 and json.loads(body)["checks"]["relay_messages"] is False


frames = st.one_of(
    st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
    st.dictionaries(st.sampled_from(["type", "id", "task", "kind", "scope", "input", "channel",
                                     "since", "key", "limit", "snapshot", "token", "answer"]),
                    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=12)
                    | st.lists(st.text(max_size=4), max_size=3)
                    | st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
                    max_size=6).map(json.dumps),
    st.sampled_from(["hello", "ping", "create", "subscribe", "get", "list", "history", "cancel",
                     "answer", "retry", "refresh", "unsubscribe", "bogus"]).map(
        lambda t: json.dumps({"type": t, "id": 1})),
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(frames, min_size=1, max_size=8))
async def test_fuzzed_frames_never_crash_or_hang_a_socket(taskcast: Process, batch: list[str]) -> None:
    """Random and malformed frames: every answer is a protocol frame or a documented close,
    and the socket still answers a ping afterwards (unless it was closed as documented)."""
    async with connect(ws_url(taskcast), compression=None) as ws:
        await ws.send('{"type":"hello","id":"h"}')
        await ws.recv()
        for frame in batch:
            await ws.send(frame)
        await ws.send('{"type":"ping","id":"last"}')
        try:
            async with asyncio.timeout(10):
                while True:
                    answer = json.loads(await ws.recv())
                    assert answer["type"] in ("pong", "error", "ack", "result", "subscribed",
                                              "update", "welcome", "resync"), answer
                    if answer["type"] == "error":
                        assert answer["code"] in ("bad_request", "unauthorized", "forbidden",
                                                  "not_found", "conflict", "rate_limited")
                    if answer == {"type": "pong", "id": "last"}:
                        break
        except ConnectionClosed as closed:
            assert closed.rcvd is not None and closed.rcvd.code in (1000, 1009, 4401, 4403, 4429)
