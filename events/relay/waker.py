"""The relay's wake-up hint for appended events, sent through Redis.

A NOTIFY in every append would make each committing transaction take PostgreSQL's single,
cluster-wide notification lock (held through the commit's WAL flush): with many writers
that lock, not the work, sets the pace. So appends poke a Waker instead, and one loop per
process publishes a coalesced hint (events/relay/bus.py) after the commit. It is only a
hint (STYLE 11): the relay also polls. Creates and claims NOTIFY instead, once a batch
(`taskcast_create_batch`, and the `claim` query of events/sql/queries.sql).
"""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from events.aio import raise_if_cancelling
from events.relay.bus import Client, bus_for

log = logging.getLogger("taskcast.waker")


class Waker:
    def __init__(self, redis: Client, channel: str) -> None:
        self.bus = bus_for(redis, channel)
        self._poked = asyncio.Event()

    def poke(self) -> None:
        """Events were committed: the relay should read soon. Cheap; never blocks."""
        self._poked.set()

    async def run(self) -> None:
        """Publish one hint per burst of pokes, until cancelled."""
        while True:
            # The publish may have swallowed this task's cancel (events/aio.py): without
            # this check the loop would wait for the next poke forever, and stop with it.
            raise_if_cancelling()
            await self._poked.wait()
            self._poked.clear()
            try:
                await self.bus.hint()
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("cannot send a wake-up hint: %s", exc)
