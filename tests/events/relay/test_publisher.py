"""The relay: leadership under an advisory lock, takeover by a standby, chained batches."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import asyncpg
import pytest
from redis.asyncio import Redis

from events.ids import Position, decode
from events.log import CreateTask, EventLog
from events.queue import Queue
from events.relay.batch import decode_batch
from events.relay.publisher import Relay, RelayConfig
from server.fanout.chain import plan
from server.settings import Settings
from tests.foreign import foreign_writes
from tests.waiting import eventually, eventually_async


@pytest.fixture
def spawn_relay(settings: Settings) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start `taskcast relay` processes; every one is killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def _standing_by(database_url: str) -> bool:
    """A relay is polling the leadership lock without holding it."""
    conn = await asyncpg.connect(database_url)
    try:
        return bool(await conn.fetchval(
            "SELECT count(*) > 0 FROM pg_stat_activity WHERE datname = current_database()"
            " AND query LIKE 'SELECT pg_try_advisory_lock%' AND pid NOT IN"
            " (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted)"))
    finally:
        await conn.close()


def _relay(settings: Settings) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url,
           "TASKCAST_CHANNEL": settings.channel, "TASKCAST_LOG": "WARNING"}
    return subprocess.Popen([sys.executable, "-m", "cli.main", "relay"], env=env)


@asynccontextmanager
async def _recording(settings: Settings) -> AsyncIterator[tuple[Redis, list[tuple[float, bytes]]]]:
    """Every message on the relay's channel, with its arrival time, while the block runs."""
    redis = Redis.from_url(settings.redis_url)
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(settings.channel)
    messages: list[tuple[float, bytes]] = []

    async def listen() -> None:
        async for message in pubsub.listen():
            messages.append((time.monotonic(), message["data"]))

    listener = asyncio.create_task(listen())
    try:
        yield redis, messages
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await redis.aclose()


async def test_a_standby_relay_takes_over_within_five_seconds_losing_nothing(
        settings: Settings, event_log: EventLog, spawn_relay: list[subprocess.Popen[bytes]]) -> None:
    """kill -9 of the leading relay: the standby publishes within 5 s, and a node following
    the chain receives every event once, in order, without a gap to fill."""
    async with _recording(settings) as (_, messages):
        start_head = await event_log.head()
        leader = _relay(settings)
        spawn_relay.append(leader)
        await eventually(lambda: len(messages) >= 1, 15)  # the leader's first heartbeat
        spawn_relay.append(_relay(settings))  # the standby
        await eventually_async(lambda: _standing_by(settings.database_url), within=15)

        created = [(await event_log.create(CreateTask("demo", "s"))).position for _ in range(20)]
        await eventually(lambda: _published(messages) >= set(created), 10)
        leader.send_signal(signal.SIGKILL)
        leader.wait(10)
        killed_at = time.monotonic()
        more = [(await event_log.create(CreateTask("demo", "s"))).position for _ in range(20)]
        await eventually(lambda: _published(messages) >= set(more), 10)
        first_after = min(t for t, m in messages if t > killed_at and _positions(m) & set(more))
        assert first_after - killed_at < 5.0

        head, routed, fills = start_head, [], 0
        for _, message in messages:
            decision = plan(head, decode_batch(message))
            fills += decision.fill_to is not None and decision.fill_to > start_head
            for update in decision.route:
                routed.append(update.position)
                head = update.position
        assert fills == 0  # the relay lost nothing
        assert routed == sorted(set(routed)) and set(routed) == set(created) | set(more)


async def test_events_flow_while_foreign_write_transactions_stay_open(
        settings: Settings, event_log: EventLog) -> None:
    """Invariant 10: with a write transaction open in this database and one in another
    database of the server, every event appended meanwhile is published before either
    commits (v1's cluster-wide xmin bound held them all until the foreign COMMIT)."""
    async with _recording(settings) as (redis, messages):
        relay = Relay(settings.database_url, event_log, redis, RelayConfig(channel=settings.channel))
        running = asyncio.create_task(relay.run())
        try:
            await asyncio.wait_for(relay.leading.wait(), 10)
            async with foreign_writes(settings.database_url):
                appended = [(await event_log.create(CreateTask("demo", "s"))).position for _ in range(30)]
                await eventually(lambda: _published(messages) >= set(appended), 5)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)


async def test_a_claim_wakes_the_relay_as_it_commits(settings: Settings, event_log: EventLog) -> None:
    """A claim's `task.started` is published as soon as the claim commits, woken by the
    claim's own notification: no Redis hint is sent here, and the relay's poll and
    heartbeat are an hour away."""
    config = RelayConfig(channel=settings.channel, poll_s=3600, heartbeat_s=3600)
    async with _recording(settings) as (redis, messages):
        relay = Relay(settings.database_url, event_log, redis, config)
        running = asyncio.create_task(relay.run())
        try:
            await asyncio.wait_for(relay.leading.wait(), 10)
            created = await event_log.create(CreateTask("demo", "s"))  # a create NOTIFYs too
            await eventually(lambda: created.position in _published(messages), 5)
            [claim] = await Queue(event_log.pool).claim("worker-1", ["demo"], limit=1, lease_s=30)
            started = decode(claim.view["position"])
            await eventually(lambda: started in _published(messages), 5)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)


async def test_a_backlog_and_writes_meanwhile_are_published_in_order_once(
        settings: Settings, event_log: EventLog) -> None:
    """A backlog of 12 full batches, and the writes while the relay works through it, go out
    as one unbroken chain: every event once, in log order, no gap for a node to fill."""
    config = RelayConfig(channel=settings.channel, batch_events=25)
    async with _recording(settings) as (redis, messages):
        first = Relay(settings.database_url, event_log, redis, config)
        running = asyncio.create_task(first.run())
        try:  # a first leader records where it starts: what comes after is the backlog
            await asyncio.wait_for(first.leading.wait(), 10)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
        start_head = await event_log.head()
        backlog = await asyncio.gather(*(event_log.create(CreateTask("demo", "s")) for _ in range(300)))
        relay = Relay(settings.database_url, event_log, redis, config)
        running = asyncio.create_task(relay.run())
        try:
            await asyncio.wait_for(relay.leading.wait(), 10)
            meanwhile = []
            for _ in range(10):  # partial batches, and wake-ups while a batch is published
                meanwhile += await asyncio.gather(*(event_log.create(CreateTask("demo", "s"))
                                                    for _ in range(15)))
            written = {a.position for a in [*backlog, *meanwhile]}
            await eventually(lambda: _published(messages) >= written, 15)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
    head, routed = start_head, []
    for _, message in messages:
        decision = plan(head, decode_batch(message))
        assert decision.fill_to is None or decision.fill_to <= start_head  # nothing skipped
        for update in decision.route:
            routed.append(update.position)
            head = update.position
    assert routed == sorted(set(routed)) and written <= set(routed)
    sent = [u.position for _, m in messages for u in decode_batch(m).updates]
    assert sent == sorted(set(sent))  # nor published twice, which a node would only drop


def _positions(message: bytes) -> set[Position]:
    return {u.position for u in decode_batch(message).updates}


def _published(messages: list[tuple[float, bytes]]) -> set[Position]:
    return set().union(*(_positions(m) for _, m in messages)) if messages else set()
