"""The walking skeleton, end to end: a client creates a demo task and watches it finish."""

from __future__ import annotations

from typing import Any

from cli.process import Process
from events.fold import compact
from events.ids import TaskId
from tests.conftest import on_both_engines, ws_url
from tests.wsclient import Client


@on_both_engines
async def test_create_and_watch_a_demo_task(taskcast: Process) -> None:
    """create (subscribe) acks with a task id, then every version 1..N streams in order, ending
    in task.completed, and the stored projection (compacted) equals the last update's view."""
    client = await Client.open(ws_url(taskcast))
    ack = await client.request({"type": "create", "kind": "demo", "scope": "project:1",
                                "input": {"steps": 5, "step_ms": 20}, "subscribe": True})
    assert ack["type"] == "ack", ack
    assert ack["task"].startswith("tsk_") and ack["status"] == "queued" and ack["duplicate"] is False

    updates: list[dict[str, Any]] = []
    while not updates or updates[-1]["event"]["type"] != "task.completed":
        frame = await client.until(lambda f: f["type"] == "update")
        updates.append(frame)
    assert [u["event"]["version"] for u in updates] == list(range(1, len(updates) + 1))
    assert all(u["channel"] == f"task:{ack['task']}" for u in updates)
    types = [u["event"]["type"] for u in updates]
    assert types[0] == "task.created" and types[1] == "task.started"
    assert types.count("step.completed") == 5 and types.count("step.progress") >= 5
    assert types.count("task.completed") == 1
    assert updates[0]["position"] == ack["position"]

    stored = await taskcast.log.view(TaskId(ack["task"]))
    assert compact(stored) == updates[-1]["task"]
    assert stored["status"] == "completed" and stored["version"] == len(updates)
    await client.close()


async def test_bad_frames_answer_bad_request_and_the_socket_keeps_working(taskcast: Process) -> None:
    """Invalid JSON, an unknown type and a missing field each get `bad_request` (with the id
    when it could be read), and the same socket then serves a ping."""
    client = await Client.open(ws_url(taskcast))
    await client.ws.send("{not json")
    error = await client.recv()
    assert error["type"] == "error" and error["code"] == "bad_request" and "id" not in error

    await client.send({"type": "frobnicate", "id": 7})
    error = await client.recv()
    assert error == {**error, "type": "error", "code": "bad_request", "id": 7}

    await client.send({"type": "create", "id": "c1", "scope": "project:1", "input": {}})
    error = await client.recv()
    assert error["code"] == "bad_request" and error["id"] == "c1" and "kind" in error["message"]

    assert await client.request({"type": "ping"}) == {"type": "pong", "id": client.next_id}
    await client.close()
