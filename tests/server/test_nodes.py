"""Several nodes, no load balancer: a client moves between them with `since`, and a node
killed with kill -9 mid-stream costs its clients nothing but a reconnect."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cli.process import Process
from server.settings import Settings
from tests.conftest import Launch, ws_url
from tests.spawn import taskcast
from tests.waiting import eventually, free_port, listening
from tests.wsclient import Client, Versions

SCOPE = "project:nodes"


@pytest.fixture
async def other_node(settings: Settings) -> AsyncIterator[tuple[subprocess.Popen[bytes], str]]:
    """A second node, `taskcast serve` in its own process (so it can be killed), on the same
    PostgreSQL and Redis; its process and websocket url."""
    port = free_port()
    proc = taskcast(settings, "serve", "--port", str(port), "--processes", "1")
    try:
        await eventually(lambda: listening(port), 30)
        yield proc, f"ws://127.0.0.1:{port}/ws"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def follow(url: str, versions: Versions, since: str | None, updates: int) -> tuple[Client, str | None]:
    """On the node at `url`: subscribe to the scope (from `since`), record `updates` update
    frames (or all until every task completed); the client and the last position seen."""
    client = await Client.open(url)
    frame: dict[str, Any] = {"type": "subscribe", "channel": f"scope:{SCOPE}"}
    if since is not None:
        frame["since"] = since
    answer = await client.request(frame)
    assert answer["type"] == "subscribed", answer
    for _ in range(updates):
        update = await client.until(lambda f: f["type"] == "update", within=30)
        versions(update)
        since = update["position"]
        if versions.tasks and versions.finished >= set(versions.tasks):
            break
    return client, since


async def test_a_client_moves_between_nodes_and_survives_one_killed(
        launch: Launch, other_node: tuple[subprocess.Popen[bytes], str]) -> None:
    """Updates followed on node A, then on node B from `since`, then (B killed with kill -9
    mid-stream) on A again from `since`: every version of every task once, in order."""
    node_a: Process = await launch(workers=1)
    proc_b, url_b = other_node
    url_a = ws_url(node_a)
    versions = Versions()
    client, since = await follow(url_a, versions, None, 0)
    for _ in range(3):
        ack = await client.request({"type": "create", "kind": "demo", "scope": SCOPE,
                                    "input": {"steps": 8, "step_ms": 150}})
        assert ack["type"] == "ack", ack
        versions.tasks.append(ack["task"])
    for _ in range(6):
        update = await client.until(lambda f: f["type"] == "update", within=30)
        versions(update)
        since = update["position"]
    await client.close()

    client, since = await follow(url_b, versions, since, 6)  # moved to B
    assert not versions.finished >= set(versions.tasks), "the tasks ended before B was killed"
    proc_b.send_signal(signal.SIGKILL)  # mid-stream
    proc_b.wait(10)
    await client.ws.wait_closed()

    client, since = await follow(url_a, versions, since, 10_000)  # back on A, to the end
    await client.close()
    assert versions.finished == set(versions.tasks)
    for task in versions.tasks:
        seen = versions.versions[task]
        assert seen == list(range(1, len(seen) + 1)), (task, seen)
