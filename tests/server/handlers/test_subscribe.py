"""`subscribe`: what a catch-up from the log delivers, and to whom."""

from __future__ import annotations

from typing import Any

import pytest

from events.ids import ZERO, encode, position
from server.protocol.auth import mint
from tests.conftest import Launch, ws_url
from tests.server.handlers.racing import answers, in_one_write, parked
from tests.wsclient import Client

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



@pytest.mark.parametrize("variant", ["task", "scope since", "scope snapshot", "all snapshot"])
async def test_a_refresh_racing_a_subscribe_never_lets_the_old_grant_through(
        launch: Launch, variant: str) -> None:
    """A `refresh` to a narrower token sent right behind a `subscribe` wins: the subscription
    is refused as refresh would drop it (`not_found` for a task, `forbidden` for a scope) or
    named in `dropped`, and no view or event of the scope no longer granted reaches the
    socket."""
    process = await launch(secret=SECRET)
    admin, task = await parked(ws_url(process), mint(SECRET, "admin", ["*"]), "project:2")
    channel, extra = {"task": (f"task:{task}", {}),
                      "scope since": ("scope:project:2", {"since": encode(ZERO)}),
                      "scope snapshot": ("scope:project:2", {"snapshot": True}),
                      "all snapshot": ("all", {"snapshot": True})}[variant]
    user = await Client.open(ws_url(process), token=mint(SECRET, "u", ["project:1", "project:2"]))
    in_one_write(user, {"type": "subscribe", "id": "s", "channel": channel, **extra},
                 {"type": "refresh", "id": "r", "token": mint(SECRET, "u", ["project:1"])})
    frames: list[dict[str, Any]] = []
    answered = await answers(user, "s", "r", seen=frames)
    subscribed, refreshed = answered["s"], answered["r"]
    assert refreshed["type"] == "result", refreshed
    if channel == "all":
        assert subscribed["type"] == "subscribed", subscribed
    else:
        refused = subscribed["type"] == "error" and subscribed["code"] == (
            "not_found" if variant == "task" else "forbidden")
        assert refused or channel in refreshed["data"]["dropped"], (subscribed, refreshed)
    # The task of project:2 moves on; nothing of it may reach the narrowed socket.
    await admin.request({"type": "answer", "task": task, "question": "q_1", "answer": "approve"})
    await admin.until(lambda f: f["type"] == "update" and f["event"]["type"] == "task.completed",
                      within=20)
    in_one_write(user, {"type": "ping", "id": "p"})
    await answers(user, "p", seen=frames)
    views = [v for f in frames if f["type"] == "subscribed" for v in f["tasks"]]
    assert all(v["scope"] == "project:1" for v in views), views
    assert not [f for f in frames if f["type"] == "update"]


@pytest.mark.parametrize("channel", ["task", "scope:p:ahead", "all"])
async def test_a_since_this_database_never_gave_out_answers_current_views_and_goes_live(
        launch: Launch, channel: str) -> None:
    """A `since` beyond the log's head (cached from another deployment or database) cannot
    be resumed: `recovered: false` with the current views, and live updates follow, rather
    than a subscription silent until the log reaches that position."""
    process = await launch()
    client = await Client.open(ws_url(process))
    ack = await client.request({"type": "create", "kind": "demo", "scope": "p:ahead",
                                "input": {"steps": 1, "step_ms": 0, "ask_step": 1},
                                "subscribe": True})
    question = await client.until(lambda f: f["type"] == "update"
                                  and f["event"]["type"] == "task.question")
    channel = f"task:{ack['task']}" if channel == "task" else channel
    ahead = encode(position(2**40, 7))  # a transaction id this database has not reached
    sub = await client.request({"type": "subscribe", "channel": channel, "since": ahead})
    assert sub["type"] == "subscribed" and sub["recovered"] is False, sub
    assert [(t["id"], t["version"]) for t in sub["tasks"]] == [
        (ack["task"], question["event"]["version"])]
    assert sub["position"] < ahead
    await client.request({"type": "answer", "task": ack["task"], "question": "q_1",
                          "answer": "approve"})
    await client.until(lambda f: f["type"] == "update" and f["channel"] == channel
                       and f["event"]["type"] == "task.completed", within=20)
