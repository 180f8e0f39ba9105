"""Relay latency: from an append's commit to the Redis message carrying its event.

A Relay runs as an asyncio task in this process; a redis.asyncio subscriber on the relay's
channel timestamps each message. Writers append single events at a paced RATE; each event
is matched by position to the time the message containing it was read from the
subscription. The commit happens between append() being called and it returning, so the
latency is printed from both: an upper and a lower bound.

The relay reads only events below the oldest taskcast writer in flight (events/bound.py):
write transactions of other databases, or foreign ones in this database, no longer delay
it. The script still samples how often other databases had any, as a note on the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import statistics
import time

import asyncpg
import uvloop
from benchlib import (
    BUDGET_S,
    REDIS_URL,
    StepTask,
    latency_line,
    running_tasks,
    scratch_database,
    start_waker,
    unique,
)
from redis.asyncio.client import PubSub

from events import db
from events.ids import Position
from events.log import EventLog
from events.relay.batch import decode_batch
from events.relay.bus import connect
from events.relay.publisher import Relay, RelayConfig

RATE = 1000  # events/s, all writers together
DURATION_S = 10.0
WRITERS = 8
TASKS = 64
POOL = 20  # shared by the writers and the relay, as in cli.process.Process
DRAIN_S = 3.0  # how long to wait for the last messages
SAMPLE_S = 0.05
OTHER_WRITERS = ("SELECT count(*) FROM pg_stat_activity"
                 " WHERE backend_xid IS NOT NULL AND datname IS DISTINCT FROM current_database()")


class Received:
    """Arrival time of each position seen on the channel, and the size of each message."""

    def __init__(self) -> None:
        self.at: dict[Position, float] = {}
        self.sizes: list[int] = []
        self.changed = asyncio.Event()

    async def listen(self, pubsub: PubSub) -> None:
        async for message in pubsub.listen():
            if message["type"] != "message":
                continue
            now = time.perf_counter()
            batch = decode_batch(message["data"])
            for u in batch.updates:
                self.at[u.position] = now
            if batch.updates:
                self.sizes.append(len(batch.updates))
                self.changed.set()


async def write(log: EventLog, tasks: list[StepTask], first_at: float, end: float,
                committed: dict[Position, tuple[float, float]]) -> None:
    """Append one event every WRITERS / RATE seconds from `first_at` (open loop: a late
    append does not push back the next one's schedule)."""
    interval = WRITERS / RATE
    for k, task in enumerate(itertools.cycle(tasks)):
        due = first_at + k * interval
        if due >= end:
            return
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        called = time.perf_counter()
        task.view, stored = await log.append(task.id, task.view, [task.next_event()])
        committed[stored[0].position] = (called, time.perf_counter())


async def sample_other_writers(url: str, samples: list[int]) -> None:
    """Every SAMPLE_S, how many transactions of other databases hold a transaction id."""
    conn = await asyncpg.connect(url)
    try:
        while True:
            samples.append(await conn.fetchval(OTHER_WRITERS))
            await asyncio.sleep(SAMPLE_S)
    finally:
        await conn.close()


async def main() -> None:
    channel = unique("taskcast:bench:relay")
    async with asyncio.timeout(BUDGET_S), scratch_database("relay") as url:
        pool = await db.create_pool(url, min_size=4, max_size=POOL)
        redis = connect(REDIS_URL)
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        received = Received()
        background: list[asyncio.Task[None]] = []
        others: list[int] = []
        try:
            log = EventLog(pool, on_append=start_waker(redis, channel).poke)
            await pubsub.subscribe(channel)
            background.append(asyncio.create_task(received.listen(pubsub)))
            relay = Relay(url, log, redis, RelayConfig(channel=channel))
            background.append(asyncio.create_task(relay.run()))
            await asyncio.wait_for(relay.leading.wait(), 10)
            tasks = await running_tasks(log, TASKS)

            committed: dict[Position, tuple[float, float]] = {}
            background.append(asyncio.create_task(sample_other_writers(url, others)))
            start = time.perf_counter() + 0.05
            end = start + DURATION_S
            await asyncio.gather(*(write(log, tasks[i::WRITERS], start + i / RATE, end, committed)
                                   for i in range(WRITERS)))
            wrote_s = time.perf_counter() - start
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DRAIN_S):
                    while not committed.keys() <= received.at.keys():
                        received.changed.clear()
                        await received.changed.wait()
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            await redis.aclose()
            await pool.close()

    matched = [(received.at[p], called, returned) for p, (called, returned) in committed.items()
               if p in received.at]
    missing = len(committed) - len(matched)
    print(f"relay latency, commit -> Redis message received by a subscriber; "
          f"{len(committed)} single-event appends at {len(committed) / wrote_s:,.0f} events/s "
          f"(target {RATE}/s, {WRITERS} writers, {TASKS} tasks, pool {POOL}) over {DURATION_S:g} s")
    print(f"  from append() called:   {latency_line([at - called for at, called, _ in matched])}")
    print(f"  from append() returned: {latency_line([at - returned for at, _, returned in matched])}")
    print(f"  events per Redis message: median {statistics.median(received.sizes):g}, "
          f"max {max(received.sizes)}; not received within {DRAIN_S:g} s: {missing}")
    print(f"  other databases had open write transactions in {sum(n > 0 for n in others)} of "
          f"{len(others)} samples (every {SAMPLE_S * 1000:g} ms); they do not bound the relay's read")
    print("  includes the Redis round trip to the subscriber (publish -> deliver), and relay, "
          "writers and subscriber share one event loop")


if __name__ == "__main__":
    uvloop.run(main())
