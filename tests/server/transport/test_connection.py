"""A connection's flow control: reading pauses while `max_inflight` requests run."""

from __future__ import annotations

import asyncpg

from tests.conftest import Launch, ws_url
from tests.waiting import eventually
from tests.wsclient import Client


async def test_reading_pauses_at_max_inflight_and_resumes_when_requests_finish(
        launch: Launch, database_url: str) -> None:
    """With `max_inflight` requests waiting on PostgreSQL the socket is read no further (a
    ping sent then is not answered yet); once they finish, everything is answered."""
    process = await launch(max_inflight=4, workers=0)
    assert process.node is not None
    client = await Client.open(ws_url(process))
    ack = await client.request({"type": "create", "kind": "demo", "scope": "p", "input": {}})
    blocker = await asyncpg.connect(database_url)
    try:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
        for i in range(4):
            await client.send({"type": "get", "id": f"g{i}", "task": ack["task"]})
        (conn,) = process.node.connections
        await eventually(lambda: conn.reading_paused and conn.inflight == 4)
        await client.send({"type": "ping", "id": "late"})
        try:
            await client.until(lambda f: f.get("id") == "late", within=0.5)
            raise AssertionError("a frame was read while max_inflight requests were running")
        except TimeoutError:
            pass
        await transaction.rollback()
    finally:
        await blocker.close()
    answered = set()

    def all_answered(frame: dict[str, object]) -> bool:
        answered.add(frame.get("id"))
        return answered >= {"g0", "g1", "g2", "g3", "late"}

    await client.until(all_answered, within=10)
    await eventually(lambda: not conn.reading_paused)
