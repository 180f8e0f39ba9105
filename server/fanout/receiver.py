"""Redis to this node: receive the relay's chained batches, repair gaps, route updates.

Redis is only the fast path (invariant 1): a batch whose `prev` is not this node's head
means something was lost (a dropped message, a Redis restart or reconnect, a late start),
and the node reads the missing events from the log before routing anything after them.
"""

from __future__ import annotations

import logging
import time

from redis.asyncio import Redis

from events.aio import pause
from events.errors import Unavailable
from events.ids import Position
from events.log import EventLog
from events.relay.batch import decode_batch
from events.relay.follow import follow
from events.relay.projector import Projector
from server.fanout.chain import plan
from server.fanout.hub import Hub

log = logging.getLogger("taskcast.fanout")

FILL_PAGE = 1000


class Fanout:
    def __init__(self, redis: Redis, channel: str, hub: Hub, log_: EventLog, projector: Projector) -> None:
        self.redis = redis
        self.channel = channel
        self.hub = hub
        self.log = log_
        self.projector = projector
        self.last_message_at = 0.0  # monotonic; readiness needs messages to actually flow
        self.gaps_filled = 0
        self.errors = 0  # messages whose routing failed (logged; the loop goes on)
        self.relay_lag_s = 0.0

    async def run(self) -> None:
        """Forever: follow the relay's channel (reconnecting on any Redis failure); each
        reconnect may have lost messages, which the chain check then repairs."""
        self.hub.head = await self._initial_head()
        await follow(self.redis, self.channel, self.consume)

    async def _initial_head(self) -> Position:
        while True:
            try:
                return await self.log.head()
            except Unavailable as exc:
                log.warning("waiting for PostgreSQL: %s", exc)
                await pause(1.0)

    async def consume(self, message: bytes) -> None:
        """Route one relay message, filling any gap before it from the log. A message that
        fails is that message's problem (invariant 9): logged and counted; what it carried
        is repaired from the log when the next message shows the gap."""
        try:
            await self._consume(message)
        except Exception:
            self.errors += 1
            log.exception("routing a relay message failed")

    async def _consume(self, message: bytes) -> None:
        try:
            batch = decode_batch(message)
        except (ValueError, KeyError, TypeError):
            self.errors += 1
            log.error("dropping a malformed relay message")
            return
        self.last_message_at = time.monotonic()
        if batch.sent_at:
            self.relay_lag_s = max(0.0, time.time() - batch.sent_at)
        decision = plan(self.hub.head, batch)
        if decision.fill_to is not None:
            try:
                await self.fill(decision.fill_to)
            except Unavailable as exc:
                # Cannot repair now: route nothing past the gap; the next message retries.
                log.warning("cannot fill a gap from the log: %s", exc)
                return
        self.hub.route(decision.route)

    async def fill(self, until: Position) -> None:
        """Route every event in (head, until] from the log."""
        self.gaps_filled += 1
        while self.hub.head < until:
            events = await self.log.read_after(self.hub.head, limit=FILL_PAGE)
            events = [e for e in events if e.position <= until]
            if not events:
                return
            self.hub.route(await self.projector.updates(events))
