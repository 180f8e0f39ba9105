"""Invariant 1: Redis is only the fast path; a node fills what Redis lost from the log."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from cli.embedded import restart_valkey, start_valkey, stop_valkey
from cli.process import Process, Roles
from events.ids import TaskId
from events.log import EventLog
from events.relay.bus import bus_for, connect
from events.relay.publisher import Relay, RelayConfig
from events.relay.waker import Waker
from server.settings import Settings
from tests.conftest import on_both_engines, ws_url
from tests.waiting import eventually_async
from tests.wsclient import Client, Versions


async def _forward(settings: Settings, target: str, keep: Callable[[int, bytes], bool]) -> None:
    """Forward the relay's messages on every partition of `settings.channel` to the same
    partition of `target`, the ones `keep(partition, message)` keeps."""
    redis = connect(settings.redis_url)
    source, sink = bus_for(redis, settings.channel), bus_for(redis, target)

    def forwarder(partition: int) -> Callable[[bytes], Awaitable[None]]:
        async def forward(message: bytes) -> None:
            if keep(partition, message):
                await sink.send(partition, message)
        return forward

    try:
        async with asyncio.TaskGroup() as group:
            for p in range(source.partitions):
                group.create_task(source.follow_partition(p, forwarder(p)))
    finally:
        await redis.aclose()


def _dropping_every(n: int) -> Callable[[int, bytes], bool]:
    """Drops every n-th message carrying events, per partition (heartbeats all pass)."""
    counts: dict[int, int] = {}

    def keep(partition: int, message: bytes) -> bool:
        if b'"events":[]' in message:
            return True
        counts[partition] = counts.get(partition, 0) + 1
        return counts[partition] % n != 0

    return keep


def _heartbeats_only(partition: int, message: bytes) -> bool:
    return b'"events":[]' in message


@pytest.fixture
async def lossy(settings: Settings) -> AsyncIterator[Process]:
    """A node behind a Redis hop that loses every second relay message carrying events."""
    node_settings = settings.with_(channel=settings.channel + ":lossy")
    proxy = asyncio.create_task(_forward(settings, node_settings.channel, _dropping_every(2)))
    async with Process(node_settings, Roles(serve=True, workers=2)) as process:
        relay = Relay(settings.database_url, process.log, process.redis,
                      RelayConfig(channel=settings.channel))
        waker = Waker(process.redis, settings.channel)  # appends wake this relay, not the node's
        process.log.on_append = waker.poke
        loops = [asyncio.create_task(relay.run()), asyncio.create_task(waker.run())]
        try:
            yield process
        finally:
            for task in [*loops, proxy]:
                task.cancel()
            await asyncio.gather(*loops, proxy, return_exceptions=True)


@on_both_engines
async def test_subscribers_get_every_version_in_order_when_redis_drops_messages(lossy: Process) -> None:
    """With half of the relay's messages lost, every subscriber still receives every
    version of every task, in order, once."""
    client = await Client.open(ws_url(lossy))
    subscribed = await client.request({"type": "subscribe", "channel": "scope:project:7"})
    assert subscribed["type"] == "subscribed"
    tasks = []
    for _ in range(6):
        ack = await client.request({"type": "create", "kind": "demo", "scope": "project:7",
                                    "input": {"steps": 4, "step_ms": 10}})
        tasks.append(ack["task"])
    record = Versions(tasks)
    await client.until(record, within=30)
    for task in tasks:
        versions = record.versions[task]
        assert versions == list(range(1, len(versions) + 1)), task
    assert lossy.node is not None and lossy.node.fanout.gaps_filled > 0
    await client.close()


@on_both_engines
async def test_a_lost_last_message_is_noticed_by_the_relay_heartbeat(settings: Settings,
                                                                     event_log: EventLog) -> None:
    """When the last message before a quiet spell is lost, the relay's heartbeat names a head
    the node has not reached, and the node fills the gap without any new event."""
    node_settings = settings.with_(channel=settings.channel + ":node")
    async with Process(node_settings, Roles(serve=True)) as process:
        assert process.node is not None
        client = await Client.open(ws_url(process))
        ack = await client.request({"type": "create", "kind": "demo", "scope": "s", "input": {},
                                    "subscribe": True})
        # The relay publishes to a channel nobody forwards, except for heartbeats: the
        # task.created message is lost; its heartbeat arrives through the node's channel.
        relay = Relay(settings.database_url, event_log, process.redis,
                      RelayConfig(channel=settings.channel, heartbeat_s=0.2))
        relaying = asyncio.create_task(relay.run())
        forward = asyncio.create_task(_forward(settings, node_settings.channel, _heartbeats_only))
        try:
            update = await client.until(lambda f: f["type"] == "update", within=10)
            assert update["event"]["version"] == 1 and update["event"]["task"] == ack["task"]
            assert process.node.fanout.gaps_filled >= 1
        finally:
            for task in (relaying, forward):
                task.cancel()
            await asyncio.gather(relaying, forward, return_exceptions=True)
            await client.close()


async def test_a_redis_restart_mid_stream_loses_nothing(settings: Settings, tmp_path: Path) -> None:
    """Redis (a Valkey of this test's own) restarts while tasks run: the relay keeps going,
    the node reconnects and fills the gap from the log; every version arrives, in order."""
    valkey = await asyncio.to_thread(start_valkey, tmp_path / "valkey", persist=False)
    try:
        async with Process(settings.with_(redis_url=valkey.url),
                           Roles(serve=True, relay=True, workers=2)) as process:
            assert process.node is not None
            client = await Client.open(ws_url(process))
            await client.request({"type": "subscribe", "channel": "scope:p:r"})
            tasks = [(await client.request({"type": "create", "kind": "demo", "scope": "p:r",
                                            "input": {"steps": 8, "step_ms": 150}}))["task"]
                     for _ in range(4)]
            record = Versions(tasks)
            await client.until(lambda f: record(f) or (f["type"] == "update"
                                                       and f["event"]["type"] == "step.completed"))
            assert process.relay is not None
            await asyncio.to_thread(stop_valkey, valkey)
            # Something must be lost to Redis while it is down, for a gap: events the relay
            # went past (its publications fail now), not only events committed meanwhile,
            # which a relay slower than the restart would publish after it, losing nothing.
            published = process.relay.published_events

            async def lost() -> bool:
                assert process.relay is not None
                return process.relay.published_events > published

            await eventually_async(lost, within=10, poll_s=0.05)
            await asyncio.to_thread(restart_valkey, valkey)
            await client.until(record, within=60)
            history = {t: len(await process.log.history(TaskId(t))) for t in tasks}
            for task in tasks:  # subscribed before they were created: every version, once
                assert record.versions[task] == list(range(1, history[task] + 1)), task
            assert process.node.fanout.gaps_filled >= 1
            await client.close()
    finally:
        await asyncio.to_thread(stop_valkey, valkey)
