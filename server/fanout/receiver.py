"""Redis to this node: receive the relay's chained batches, repair gaps, route updates.

Redis is only the fast path (invariant 1): a batch whose `prev` is not this node's head
means something was lost (a dropped message, a Redis restart or reconnect, a late start),
and the node reads the missing events from the log before routing anything after them.
On a Redis Cluster the node follows every partition (a node with an `all` subscriber needs
them all anyway), each on the master that owns it, and merges them back into log order
(server/fanout/chain.py); a partition whose shard is lost is repaired the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time

from events.aio import pause
from events.errors import Unavailable
from events.ids import Position
from events.log import EventLog
from events.relay.batch import decode_batch
from events.relay.bus import Client, Handle, bus_for
from events.relay.projector import Projector
from server.fanout.chain import Merge
from server.fanout.hub import Hub

log = logging.getLogger("taskcast.fanout")

FILL_PAGE = 1000


class Fanout:
    def __init__(self, redis: Client, channel: str, hub: Hub, log_: EventLog, projector: Projector) -> None:
        self.bus = bus_for(redis, channel)
        self.hub = hub
        self.log = log_
        self.projector = projector
        self.merge = Merge(self.bus.partitions)
        self._lock = asyncio.Lock()  # one message at a time, whichever partition it came on
        self.last_message_at = 0.0  # monotonic; readiness needs messages to actually flow
        self.gaps_filled = 0
        self.errors = 0  # messages whose routing failed (logged; the loop goes on)
        self.relay_lag_s = 0.0

    async def run(self) -> None:
        """Forever: follow each partition (reconnecting on any Redis failure); each
        reconnect may have lost messages, which the chain check then repairs."""
        self.hub.head = await self._initial_head()
        async with asyncio.TaskGroup() as group:
            for p in range(self.bus.partitions):
                group.create_task(self.bus.follow_partition(p, self._consumer(p)),
                                  name=f"node.fanout.{p}")

    def _consumer(self, partition: int) -> Handle:
        async def consume(message: bytes) -> None:
            await self.consume(partition, message)
        return consume

    async def _initial_head(self) -> Position:
        while True:
            try:
                return await self.log.head()
            except Unavailable as exc:
                log.warning("waiting for PostgreSQL: %s", exc)
                await pause(1.0)

    async def consume(self, partition: int, message: bytes) -> None:
        """Route one relay message, filling any gap before it from the log. A message that
        fails is that message's problem (invariant 9): logged and counted; what it carried
        is repaired from the log when the next message shows the gap."""
        try:
            async with self._lock:
                await self._consume(message, partition)
        except Exception:
            self.errors += 1
            log.exception("routing a relay message failed")

    async def _consume(self, message: bytes, partition: int) -> None:
        try:
            batch = decode_batch(message)
        except (ValueError, KeyError, TypeError):
            self.errors += 1
            log.error("dropping a malformed relay message")
            return
        now = self.last_message_at = time.monotonic()
        if batch.sent_at:
            self.relay_lag_s = max(0.0, time.time() - batch.sent_at)
        self.merge.offer(partition, batch, self.hub.head, now)
        if self.merge.owed is not None and self.merge.owed > self.hub.head:
            try:
                await self.fill(self.merge.owed)
            except Unavailable as exc:
                # Cannot repair now: route nothing past the gap; the next message retries.
                log.warning("cannot fill a gap from the log: %s", exc)
                return
        updates, head = self.merge.ready(self.hub.head, now)
        self.hub.route(updates)
        self.hub.advance(head)

    async def fill(self, until: Position) -> None:
        """Route every event in (head, until] from the log."""
        self.gaps_filled += 1
        while self.hub.head < until:
            events = await self.log.read_after(self.hub.head, limit=FILL_PAGE)
            events = [e for e in events if e.position <= until]
            if not events:
                break
            self.hub.route(await self.projector.updates(events))
        self.hub.advance(until)
