"""cli/client.py: the CLI's follower of one channel, over the public protocol."""

from __future__ import annotations

from typing import Any

import pytest

from cli.client import Backoff, Follower, Frame, Refused, RequestFailed, Update
from cli.process import Process
from server.protocol.auth import mint
from tests.conftest import ws_url

SECRET = "a-follower-test-secret-of-32-bytes-or-more"


class Recorder:
    """A listener that keeps everything and stops when the task ends."""

    def __init__(self) -> None:
        self.acks: list[Frame] = []
        self.views: list[Frame] = []
        self.updates: list[Update] = []
        self.states: list[str] = []

    def created(self, ack: Frame) -> bool:
        self.acks.append(ack)
        return False

    def subscribed(self, views: list[Frame]) -> bool:
        self.views += views
        return False

    def update(self, update: Update) -> bool:
        self.updates.append(update)
        return update.task["status"] == "completed"

    def connection(self, state: str, detail: str = "") -> None:
        self.states.append(state)


def test_backoff_is_exponential_with_full_jitter() -> None:
    """Each delay is drawn from [0, min(max, base * 2^n)]."""
    bounds: list[float] = []
    backoff = Backoff(base_s=0.5, max_s=5.0, rand=lambda low, high: bounds.append(high) or high)
    delays = [backoff.next_delay() for _ in range(6)]
    assert bounds == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0] and delays == bounds


def test_a_follower_needs_exactly_one_target() -> None:
    """Either a channel or a task to create."""
    with pytest.raises(ValueError):
        Follower("ws://x/ws")
    with pytest.raises(ValueError):
        Follower("ws://x/ws", channel="all", create={"kind": "demo"})


async def test_create_then_every_version_in_order(taskcast: Process) -> None:
    """A created task's updates arrive from version 1, gapless, until it completes."""
    recorder = Recorder()
    follower = Follower(ws_url(taskcast), create={"kind": "demo", "scope": "p:f",
                                                  "input": {"steps": 2, "step_ms": 10}})
    await follower.run(recorder)
    assert len(recorder.acks) == 1 and recorder.states == ["connected"]
    versions = [u.event["version"] for u in recorder.updates]
    assert versions == list(range(1, len(versions) + 1))


async def test_refusals_end_the_follower(launch: Any) -> None:
    """4401 raises Refused; an error answering the subscribe raises RequestFailed."""
    process = await launch(secret=SECRET, workers=0)
    with pytest.raises(Refused, match="4401"):
        await Follower(ws_url(process), channel="all").run(Recorder())
    follower = Follower(ws_url(process), channel="task:tsk_nope", token=mint(SECRET, "me", ["*"]))
    with pytest.raises(RequestFailed) as failed:
        await follower.run(Recorder())
    assert failed.value.code == "not_found"
