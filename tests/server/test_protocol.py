"""Conformance: PROTOCOL.md, row by row, with a raw websocket client."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from cli.process import Process
from tests.conftest import Launch, ws_url
from tests.waiting import eventually_async
from tests.wsclient import Client


async def _closed_with(client: Client, within: float = 10) -> int | None:
    try:
        async with asyncio.timeout(within):
            while True:
                await client.ws.recv()
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None


async def _finished(client: Client, task: str, within: float = 20) -> list[dict[str, Any]]:
    """Updates of `task` until its terminal event."""
    seen: list[dict[str, Any]] = []

    def done(frame: dict[str, Any]) -> bool:
        if frame["type"] == "update" and frame["event"]["task"] == task:
            seen.append(frame)
            return frame["task"]["status"] in ("completed", "failed", "cancelled", "timed_out")
        return False

    await client.until(done, within)
    return seen


# Transport


async def test_the_subprotocol_is_selected_when_offered_and_optional(taskcast: Process) -> None:
    """`taskcast.v1` is selected when offered; a client offering none is still served."""
    async with connect(ws_url(taskcast), subprotocols=["taskcast.v1"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "taskcast.v1"
    async with connect(ws_url(taskcast)) as ws:
        assert ws.subprotocol is None
        await ws.send('{"type":"hello","id":1}')
        assert orjson.loads(await ws.recv())["type"] == "welcome"


async def test_a_binary_message_is_an_error_and_the_socket_stays(taskcast: Process) -> None:
    """Binary messages are answered with bad_request; the connection stays open."""
    client = await Client.open(ws_url(taskcast))
    await client.ws.send(b"\x00\x01")
    assert (await client.recv())["code"] == "bad_request"
    assert (await client.request({"type": "ping"}))["type"] == "pong"


async def test_a_frame_over_max_frame_bytes_closes_1009(launch: Launch) -> None:
    """A message larger than max_frame_bytes closes the connection with 1009."""
    process = await launch(max_frame_bytes=4096, workers=0)
    client = await Client.open(ws_url(process))
    await client.send({"type": "ping", "id": 1, "pad": "x" * 5000})
    assert await _closed_with(client) == 1009


# Session


async def test_nothing_but_ping_is_served_before_hello(taskcast: Process) -> None:
    """Before hello: unauthorized for every frame; ping is answered."""
    client = await Client.open(ws_url(taskcast), hello=False)
    assert (await client.request({"type": "get", "task": "tsk_x"}))["code"] == "unauthorized"
    assert (await client.request({"type": "ping"}))["type"] == "pong"
    welcome = await client.request({"type": "hello", "client": "t/1"})
    assert welcome["type"] == "welcome" and welcome["session"] and welcome["node"] == "test-node"
    assert set(welcome["limits"]) >= {"max_frame_bytes", "max_subscriptions", "rate_per_s"}
    assert welcome["heartbeat_s"] > 0
    assert (await client.request({"type": "hello"}))["code"] == "bad_request"


async def test_no_hello_within_the_timeout_closes_4408(launch: Launch) -> None:
    """A socket that sends no hello within hello_timeout_s is closed with 4408."""
    process = await launch(hello_timeout_s=0.5, workers=0)
    client = await Client.open(ws_url(process), hello=False)
    assert await _closed_with(client) == 4408


async def test_heartbeat_server_pings_and_a_silent_client_is_closed_4408(launch: Launch) -> None:
    """The server pings after heartbeat_s of silence; a client silent for 2x is closed 4408."""
    process = await launch(heartbeat_s=0.5, workers=0)
    client = await Client.open(ws_url(process))
    ping = await client.until(lambda f: f["type"] == "ping", within=5)
    assert isinstance(ping["id"], str)
    assert await _closed_with(client) == 4408


# Commands


async def test_create_acks_with_task_status_position(taskcast: Process) -> None:
    """`create` answers ack {task, status, position, duplicate} once durable."""
    client = await Client.open(ws_url(taskcast))
    ack = await client.request({"type": "create", "kind": "demo", "scope": "p:1", "input": {},
                                "labels": ["a"], "priority": 3, "timeout_s": 60})
    assert ack["type"] == "ack" and ack["status"] == "queued" and ack["duplicate"] is False
    assert isinstance(ack["position"], str)
    view = (await client.request({"type": "get", "task": ack["task"]}))["data"]
    assert view["labels"] == ["a"] and view["kind"] == "demo" and view["scope"] == "p:1"


async def test_a_repeated_key_returns_the_original_ack(taskcast: Process) -> None:
    """The same key returns the original ack with duplicate: true and changes nothing."""
    client = await Client.open(ws_url(taskcast))
    frame = {"type": "create", "kind": "demo", "scope": "p:1", "input": {"steps": 0}, "key": "k-1"}
    first, again = await client.request(frame), await client.request(frame)
    assert again == {**first, "id": again["id"], "duplicate": True}
    page = (await client.request({"type": "list", "scope": "p:1"}))["data"]
    assert [t["id"] for t in page["tasks"]] == [first["task"]]


async def test_create_of_an_unknown_kind_is_bad_request(taskcast: Process) -> None:
    """Only registered kinds can be created."""
    client = await Client.open(ws_url(taskcast))
    error = await client.request({"type": "create", "kind": "nope", "scope": "p", "input": {}})
    assert error["code"] == "bad_request" and "demo" in error["message"]


async def test_cancel_a_queued_task_at_once_and_a_finished_one_is_conflict(launch: Launch) -> None:
    """A queued task is cancelled at once; cancelling it again is a conflict."""
    process = await launch(workers=0)
    client = await Client.open(ws_url(process))
    ack = await client.request({"type": "create", "kind": "demo", "scope": "p", "input": {}})
    cancelled = await client.request({"type": "cancel", "task": ack["task"], "reason": "no"})
    assert cancelled["type"] == "ack" and cancelled["status"] == "cancelled"
    again = await client.request({"type": "cancel", "task": ack["task"]})
    assert again["code"] == "conflict" and again["retryable"] is False
    missing = await client.request({"type": "cancel", "task": "tsk_missing"})
    assert missing["code"] == "not_found"


async def test_cancel_a_running_task_stops_it(taskcast: Process) -> None:
    """A running task is asked to stop and ends cancelled, with one terminal event."""
    client = await Client.open(ws_url(taskcast))
    ack = await client.request({"type": "create", "kind": "demo", "scope": "p", "subscribe": True,
                                "input": {"steps": 50, "step_ms": 100}})
    await client.until(lambda f: f["type"] == "update" and f["event"]["type"] == "step.started")
    cancelled = await client.request({"type": "cancel", "task": ack["task"]})
    assert cancelled["type"] == "ack" and cancelled["status"] == "running"
    updates = await _finished(client, ack["task"])
    types = [u["event"]["type"] for u in updates]
    assert types[-1] == "task.cancelled" and "task.cancel_requested" in types


async def test_answer_to_a_question_not_pending_is_conflict(taskcast: Process) -> None:
    """`answer` needs a pending question."""
    client = await Client.open(ws_url(taskcast))
    ack = await client.request({"type": "create", "kind": "demo", "scope": "p", "input": {"steps": 0}})
    error = await client.request({"type": "answer", "task": ack["task"], "question": "q_1",
                                  "answer": "approve"})
    assert error["code"] == "conflict"


async def test_retry_reruns_a_cancelled_task_to_completion(launch: Launch) -> None:
    """`retry` of a cancelled task queues it again; it runs and completes."""
    process = await launch(workers=1)
    client = await Client.open(ws_url(process))
    blocker = await client.request({"type": "create", "kind": "demo", "scope": "p",
                                    "input": {"steps": 1, "ask_step": 1}})  # parks on its question
    ack = await client.request({"type": "create", "kind": "demo", "scope": "p",
                                "input": {"steps": 2, "step_ms": 1}, "depends_on": [blocker["task"]]})
    assert ack["status"] == "waiting"
    cancelled = await client.request({"type": "cancel", "task": ack["task"]})
    sub = await client.request({"type": "subscribe", "channel": f"task:{ack['task']}",
                                "since": cancelled["position"]})
    assert sub["type"] == "subscribed"
    retried = await client.request({"type": "retry", "task": ack["task"]})
    assert retried["type"] == "ack" and retried["status"] == "retrying"
    updates = await _finished(client, ack["task"])
    assert updates[-1]["event"]["type"] == "task.completed"
    assert updates[-1]["task"]["attempt"] == 2
    error = await client.request({"type": "retry", "task": ack["task"]})
    assert error["code"] == "conflict"


# Queries


async def test_get_and_not_found(taskcast: Process) -> None:
    """`get` returns the task view; an unknown task is not_found."""
    client = await Client.open(ws_url(taskcast))
    ack = await client.request({"type": "create", "kind": "demo", "scope": "p", "input": {"steps": 0}})
    view = (await client.request({"type": "get", "task": ack["task"]}))["data"]
    assert view["id"] == ack["task"] and view["version"] >= 1 and view["position"]
    assert (await client.request({"type": "get", "task": "tsk_none"}))["code"] == "not_found"


async def test_list_filters_and_pages_with_a_cursor(launch: Launch) -> None:
    """`list` filters by scope, status, kind and label, and pages with a cursor."""
    process = await launch(workers=0)
    client = await Client.open(ws_url(process))
    made = []
    for i in range(5):
        ack = await client.request({"type": "create", "kind": "demo", "scope": "p:list",
                                    "input": {}, "labels": ["even" if i % 2 == 0 else "odd"]})
        made.append(ack["task"])
    await client.request({"type": "create", "kind": "demo", "scope": "p:other", "input": {}})
    await client.request({"type": "cancel", "task": made[0]})

    first = (await client.request({"type": "list", "scope": "p:list", "limit": 3}))["data"]
    assert [t["id"] for t in first["tasks"]] == made[::-1][:3] and first["cursor"] and first["position"]
    rest = (await client.request({"type": "list", "scope": "p:list", "limit": 3,
                                  "cursor": first["cursor"]}))["data"]
    assert [t["id"] for t in rest["tasks"]] == made[::-1][3:] and rest["cursor"] is None
    even = (await client.request({"type": "list", "label": "even", "status": ["queued"]}))["data"]
    assert {t["id"] for t in even["tasks"]} == {made[2], made[4]}
    assert (await client.request({"type": "list", "limit": 501}))["code"] == "bad_request"
    assert (await client.request({"type": "list", "cursor": "zzz"}))["code"] == "bad_request"


async def test_history_pages_by_version(taskcast: Process) -> None:
    """`history` returns events after a version, with `more` when the limit cut it."""
    client = await Client.open(ws_url(taskcast))
    ack = await client.request({"type": "create", "kind": "demo", "scope": "p", "subscribe": True,
                                "input": {"steps": 3, "step_ms": 1}})
    updates = await _finished(client, ack["task"])
    page = (await client.request({"type": "history", "task": ack["task"], "after": 2, "limit": 3}))["data"]
    assert [e["version"] for e in page["events"]] == [3, 4, 5] and page["more"] is True
    assert page["events"][0] == updates[2]["event"]
    tail = (await client.request({"type": "history", "task": ack["task"], "after": 3}))["data"]
    assert tail["more"] is False and tail["events"][-1]["type"] == "task.completed"


# Subscriptions


async def test_subscribe_since_an_ack_position_receives_exactly_what_came_after(taskcast: Process) -> None:
    """`since` = an ack's position: every later event of the channel once, then live ones."""
    client = await Client.open(ws_url(taskcast))
    ack = await client.request({"type": "create", "kind": "demo", "scope": "p:since",
                                "input": {"steps": 3, "step_ms": 30}})
    watcher = await Client.open(ws_url(taskcast))
    sub = await watcher.request({"type": "subscribe", "channel": f"task:{ack['task']}",
                                 "since": ack["position"]})
    assert sub["recovered"] is True and sub["position"] == ack["position"]
    updates = await _finished(watcher, ack["task"])
    assert [u["event"]["version"] for u in updates] == list(range(2, len(updates) + 2))


async def test_snapshot_gives_current_views_then_live_updates(taskcast: Process) -> None:
    """`snapshot: true`: the current views, consistent with `position`, then live events."""
    client = await Client.open(ws_url(taskcast))
    ack = await client.request({"type": "create", "kind": "demo", "scope": "p:snap",
                                "input": {"steps": 5, "step_ms": 40}})
    async def running() -> bool:  # the snapshot catches it mid-run
        return (await taskcast.log.view(ack["task"]))["status"] == "running"

    await eventually_async(running, within=10, poll_s=0.01)
    sub = await client.request({"type": "subscribe", "channel": "scope:p:snap", "snapshot": True})
    (view,) = sub["tasks"]
    assert view["id"] == ack["task"]
    updates = await _finished(client, ack["task"])
    versions = [u["event"]["version"] for u in updates]
    assert versions == list(range(view["version"] + 1, view["version"] + 1 + len(versions)))


async def test_all_channel_and_unsubscribe(taskcast: Process) -> None:
    """`all` carries every scope's events; `unsubscribe` stops them and answers result."""
    client = await Client.open(ws_url(taskcast))
    sub = await client.request({"type": "subscribe", "channel": "all"})
    assert sub["type"] == "subscribed" and sub["channel"] == "all"
    ack = await client.request({"type": "create", "kind": "demo", "scope": "p:all", "input": {"steps": 0}})
    update = await client.until(lambda f: f["type"] == "update")
    assert update["channel"] == "all" and update["event"]["task"] == ack["task"]
    done = await client.request({"type": "unsubscribe", "channel": "all"})
    assert done["type"] == "result"
    missing = await client.request({"type": "unsubscribe", "channel": "all"})
    assert missing["code"] == "not_found"


async def test_bad_channels_and_positions_are_bad_request(taskcast: Process) -> None:
    """Unknown channel forms and positions the server never gave are refused."""
    client = await Client.open(ws_url(taskcast))
    for frame in ({"channel": "room:1"}, {"channel": "task:"}, {"channel": "all", "since": "nope"}):
        error = await client.request({"type": "subscribe", **frame})
        assert error["code"] == "bad_request", frame


async def test_max_subscriptions_is_enforced(launch: Launch) -> None:
    """A socket holds at most max_subscriptions subscriptions."""
    process = await launch(max_subscriptions=2, workers=0)
    client = await Client.open(ws_url(process))
    for scope in ("a", "b"):
        answer = await client.request({"type": "subscribe", "channel": f"scope:{scope}"})
        assert answer["type"] == "subscribed"
    assert (await client.request({"type": "subscribe", "channel": "scope:c"}))["type"] == "error"


# Errors and limits


async def test_too_many_frames_is_rate_limited_then_closed_4429(launch: Launch) -> None:
    """Over rate_per_s: an error rate_limited; persisting for seconds, close 4429."""
    process = await launch(rate_per_s=20, workers=0)
    client = await Client.open(ws_url(process))

    async def flood() -> None:
        try:
            for burst in range(40):
                for i in range(30):
                    await client.send({"type": "ping", "id": burst * 100 + i})
                await asyncio.sleep(0.25)  # pacing a flood (20/s allowed), not waiting on a condition
        except ConnectionClosed:
            pass

    flooding = asyncio.create_task(flood())
    limited = await client.until(lambda f: f.get("code") == "rate_limited")
    assert limited["retryable"] is True
    assert await _closed_with(client, within=8) == 4429
    await flooding


@pytest.mark.parametrize("frame", [
    {"type": "create", "kind": "demo", "scope": "", "input": {}},
    {"type": "create", "kind": "demo", "scope": "p", "input": {}, "timeout_s": -1},
    {"type": "history", "task": "t", "limit": 0},
])
async def test_out_of_range_fields_are_bad_request(taskcast: Process, frame: dict[str, Any]) -> None:
    """Values of the right type but outside their range are refused as bad_request."""
    client = await Client.open(ws_url(taskcast))
    assert (await client.request(frame))["code"] == "bad_request"


# Close codes


async def test_shutdown_closes_sockets_with_1001(launch: Launch) -> None:
    """A node going away closes its sockets with 1001."""
    process = await launch(workers=0)
    client = await Client.open(ws_url(process))
    assert process.node is not None
    stopping = asyncio.create_task(process.node.stop())
    assert await _closed_with(client) == 1001
    await stopping


async def test_a_since_older_than_retention_answers_current_views(taskcast: Process) -> None:
    """`since` before trimmed history: recovered false, `tasks` holds the current views."""
    client = await Client.open(ws_url(taskcast))
    ack = await client.request({"type": "create", "kind": "demo", "scope": "p:old", "subscribe": True,
                                "input": {"steps": 1, "step_ms": 1}})
    updates = await _finished(client, ack["task"])
    assert await taskcast.log.prune(0) == 1
    sub = await client.request({"type": "subscribe", "channel": "scope:p:old", "since": ack["position"]})
    assert sub["recovered"] is False
    assert [t["id"] for t in sub["tasks"]] == [ack["task"]]
    assert sub["tasks"][0]["version"] == updates[-1]["event"]["version"]
