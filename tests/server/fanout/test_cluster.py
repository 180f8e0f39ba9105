"""On a real Redis Cluster: partitions merged back into log order, and a master killed."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cli.embedded.cluster import EmbeddedCluster, stop_cluster
from cli.process import Process, Roles
from events.ids import TaskId
from events.relay.batch import partition_of
from events.relay.bus import PARTITIONS
from server.settings import Settings
from tests.conftest import cluster_or_skip, ws_url
from tests.waiting import eventually_async
from tests.wsclient import Client, Versions

SCOPES = [f"project:{i}" for i in range(12)]


def test_the_scopes_here_span_many_partitions() -> None:
    """What the tests below rely on: their tasks' events travel on several shard channels."""
    assert len({partition_of(s, PARTITIONS) for s in SCOPES}) >= 6


async def _create(client: Client, scope: str, steps: int, step_ms: int) -> str:
    ack = await client.request({"type": "create", "kind": "demo", "scope": scope,
                                "input": {"steps": steps, "step_ms": step_ms}})
    assert ack["type"] == "ack", ack
    return str(ack["task"])


@pytest.mark.parametrize("redis_url", ["cluster"], indirect=True)
async def test_all_is_in_log_order_across_partitions_and_resumes_exactly(taskcast: Process) -> None:
    """An `all` subscriber gets the events of tasks on every partition in log order (positions
    only grow), and one resuming with `since` from the middle gets exactly the rest."""
    client = await Client.open(ws_url(taskcast))
    await client.request({"type": "subscribe", "channel": "all"})
    tasks = [await _create(client, scope, 4, 10) for scope in SCOPES]
    frames: list[dict[str, Any]] = []

    def record(frame: dict[str, Any]) -> bool:
        if frame["type"] == "update":
            frames.append(frame)
        return done(frame)

    done = Versions(tasks)
    await client.until(record, within=60)
    positions = [f["position"] for f in frames]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    for task in tasks:
        assert done.versions[task] == list(range(1, len(done.versions[task]) + 1)), task

    middle = frames[len(frames) // 2]["position"]
    again = await Client.open(ws_url(taskcast))
    sub = await again.request({"type": "subscribe", "channel": "all", "since": middle})
    assert sub["recovered"] is True
    expected = [p for p in positions if p > middle]
    resumed = [(await again.until(lambda f: f["type"] == "update"))["position"] for _ in expected]
    assert resumed == expected
    await client.close()
    await again.close()


@pytest.fixture
async def own_cluster(tmp_path: Path) -> AsyncIterator[EmbeddedCluster]:
    """A Redis Cluster of this test's own (three masters, a replica each), which it may break."""
    cluster = await asyncio.to_thread(cluster_or_skip, tmp_path / "cluster")
    try:
        yield cluster
    finally:
        await asyncio.to_thread(stop_cluster, cluster)


async def test_a_master_killed_mid_stream_loses_nothing(settings: Settings,
                                                       own_cluster: EmbeddedCluster) -> None:
    """kill -9 of a master while tasks on every partition run: its replica is promoted, and
    every subscriber still gets every version of every task exactly once, in order (what was
    published to the dead master meanwhile is read from the log)."""
    async with Process(settings.with_(redis_url=own_cluster.url),
                       Roles(serve=True, relay=True, workers=2)) as process:
        assert process.node is not None and process.relay is not None
        await asyncio.wait_for(process.relay.leading.wait(), 10)
        client = await Client.open(ws_url(process))
        for scope in SCOPES:
            await client.request({"type": "subscribe", "channel": f"scope:{scope}"})
        tasks = [await _create(client, scope, 10, 100) for scope in SCOPES]
        record = Versions(tasks)
        await client.until(lambda f: record(f) or (f["type"] == "update"
                                                   and f["event"]["type"] == "step.completed"),
                           within=30)
        masters = own_cluster.masters()
        victim = masters[0]
        os.kill(victim.pid, signal.SIGKILL)

        async def promoted() -> bool:
            now = await asyncio.to_thread(own_cluster.masters)
            return victim not in now and len(now) == len(masters)

        await eventually_async(promoted, within=30, poll_s=0.2)
        tasks += [await _create(client, scope, 2, 10) for scope in SCOPES]  # after the failover
        await client.until(record, within=90)
        for task in tasks:
            history = len(await process.log.history(TaskId(task)))
            assert record.versions[task] == list(range(1, history + 1)), task
        assert process.node.fanout.gaps_filled >= 1
        await client.close()
