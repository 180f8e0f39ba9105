"""The relay: tails the log in position order and publishes chained batches to Redis.

One relay leads at a time: leadership is a session-level advisory lock held on a dedicated
connection, so it is released the moment that connection dies, and a standby (polling the
lock every `standby_poll_s`) takes over. Messages are chained (`prev`), and the relay
publishes its head at least every `heartbeat_s`, so a node notices any lost message,
the last one included (invariant 1). On a Redis Cluster each batch and heartbeat is one
message per partition (events/relay/bus.py). Re-publishing after a takeover is harmless: nodes
drop positions they have already delivered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import asyncpg
from redis.exceptions import RedisError

from events import db, tracing
from events.aio import pause, stop_tasks, wait_event
from events.errors import Unavailable
from events.ids import position, split
from events.log import EventLog
from events.metrics import RelayMetrics
from events.relay.batch import encode_parts
from events.relay.bus import Client, bus_for
from events.relay.projector import Projector
from events.sql import q

log = logging.getLogger("taskcast.relay")

RELAY_LOCK = 0x7463_7265_6C61_79  # "tcrelay"


@dataclass(frozen=True)
class RelayConfig:
    channel: str
    batch_events: int = 500
    heartbeat_s: float = 1.0
    poll_s: float = 0.1  # the fallback when no wake-up hint arrives
    standby_poll_s: float = 1.0
    save_every_s: float = 0.5


class Relay:
    def __init__(self, database_url: str, log_: EventLog, redis: Client, config: RelayConfig) -> None:
        self.database_url = database_url
        self.log = log_
        self.bus = bus_for(redis, config.channel)
        self.config = config
        self.projector = Projector(log_)
        self.leading = asyncio.Event()
        self.published_events = 0
        self.metrics = RelayMetrics(self)

    async def run(self) -> None:
        """Forever: wait for leadership, then publish until it is lost. Cancel to stop."""
        while True:
            try:
                conn = await db.connect(self.database_url)
            except Unavailable as exc:
                log.warning("relay cannot reach PostgreSQL: %s", exc)
                await pause(self.config.standby_poll_s)
                continue
            try:
                if await conn.fetchval("SELECT pg_try_advisory_lock($1)", RELAY_LOCK):
                    log.info("relay is leading")
                    await self._lead(conn)
                else:
                    await pause(self.config.standby_poll_s)
            except (Unavailable, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("relay lost PostgreSQL, standing by: %s", exc)
                await pause(self.config.standby_poll_s)
            except Exception:
                log.exception("relay failed; restarting")
                await pause(self.config.standby_poll_s)
            finally:
                self.leading.clear()
                conn.terminate()

    async def _lead(self, conn: asyncpg.Connection) -> None:
        wake = asyncio.Event()
        await conn.add_listener("taskcast_events", lambda *_: wake.set())
        hints = asyncio.create_task(self._hints(wake), name="relay.hints")
        try:
            await self._publish_loop(conn, wake)
        finally:
            await stop_tasks([hints], 5.0, log)

    async def _hints(self, wake: asyncio.Event) -> None:
        """Appenders' wake-up hints through Redis (events/relay/waker.py)."""
        async def woken(_: bytes) -> None:
            wake.set()

        await self.bus.follow_hints(woken)

    async def _publish_loop(self, conn: asyncpg.Connection, wake: asyncio.Event) -> None:
        row = await conn.fetchrow(q("relay_cursor"))
        if row is not None:
            cursor = position(row["xid"], row["seq"])
        else:
            # The first leader ever starts at the head, and records it at once: a leader
            # killed before its first periodic save must not make the next one start from
            # a later head and never publish what came between.
            cursor = await self.log.head()
            await conn.execute(q("save_relay_cursor"), *split(cursor))
        saved, last_publish, last_save = cursor, 0.0, time.monotonic()
        # A notification whose events are not readable yet (an older taskcast writer is
        # still in flight and holds the read bound, events/bound.py) is retried quickly,
        # with a doubling delay, instead of waiting for the next poll.
        notified, misses = False, 0
        self.leading.set()
        while not conn.is_closed():
            wake.clear()
            events = await self.log.read_after(cursor, limit=self.config.batch_events)
            now = time.monotonic()
            if events:
                misses = 0
            elif notified or misses:
                misses += 1
            if events:
                updates = await self.projector.updates(events)
                head = events[-1].position
                await self._publish(encode_parts(cursor, updates, head, self.bus.partitions, time.time()))
                cursor = head
                self.published_events += len(events)
                self.metrics.published(events, time.time())
                await tracing.published(self.log.pool, events, time.time_ns())
                last_publish = now
                if len(events) == self.config.batch_events:
                    continue  # more are waiting: no sleep
            elif now - last_publish >= self.config.heartbeat_s:
                await self._publish(encode_parts(cursor, [], cursor, self.bus.partitions, time.time()))
                last_publish = now
            if cursor != saved and now - last_save >= self.config.save_every_s:
                await conn.execute(q("save_relay_cursor"), *split(cursor))
                saved, last_save = cursor, now
            timeout = min(self.config.poll_s, self.config.heartbeat_s - (now - last_publish))
            if misses:
                retry_s = 0.001 * 2 ** misses
                if retry_s > self.config.poll_s:
                    misses = 0
                timeout = min(timeout, retry_s)
            notified = await wait_event(wake, max(timeout, 0.001))
        raise Unavailable("the relay's leadership connection closed")

    async def _publish(self, messages: list[bytes]) -> None:
        # Redis is only the fast path: when it (or one shard of it) is down the relay keeps
        # going, and nodes fill what they missed from the log.
        try:
            await self.bus.publish(messages)
        except (RedisError, OSError, TimeoutError) as exc:
            self.metrics.publish_errors.inc()
            log.warning("relay cannot publish to Redis: %s", exc)
