"""`subscribe`: what a catch-up from the log delivers, and to whom."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from cli.process import Process
from events.ids import ZERO, encode
from server.protocol.auth import mint
from tests.conftest import ws_url
from tests.wsclient import Client

Launch = Callable[..., Awaitable[Process]]
SECRET = "a-secret-for-tests-that-is-32-bytes-long"


async def test_an_all_catch_up_carries_only_the_principals_scopes(launch: Launch) -> None:
    """`all` with `since` replays from the log only the events of scopes the principal
    holds, every one of them, in order."""
    process = await launch(secret=SECRET)
    admin = await Client.open(ws_url(process), token=mint(SECRET, "admin", ["*"]))
    tasks = {}
    for scope in ("project:2", "project:1"):  # project:2 first: its events precede in the log
        ack = await admin.request({"type": "create", "kind": "demo", "scope": scope,
                                   "input": {"steps": 1, "step_ms": 0}, "subscribe": True})
        await admin.until(lambda f, t=ack["task"]: f["type"] == "update" and f["event"]["task"] == t
                          and f["event"]["type"] == "task.completed", within=20)
        tasks[scope] = ack["task"]
    one = await Client.open(ws_url(process), token=mint(SECRET, "one", ["project:1"]))
    sub = await one.request({"type": "subscribe", "channel": "all", "since": encode(ZERO)})
    assert sub["type"] == "subscribed" and sub["recovered"] is True
    seen: list[dict[str, Any]] = []

    def done(frame: dict[str, Any]) -> bool:
        if frame["type"] == "update":
            seen.append(frame)
        return frame["type"] == "update" and frame["event"]["type"] == "task.completed" \
            and frame["event"]["task"] == tasks["project:1"]

    await one.until(done, within=20)
    assert {f["event"]["task"] for f in seen} == {tasks["project:1"]}
    versions = [f["event"]["version"] for f in seen]
    assert versions == list(range(1, len(versions) + 1))
