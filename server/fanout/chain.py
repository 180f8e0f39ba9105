"""The gap detector: decides, for each relay message, what a node must fill from the log,
and merges the partitions of a Redis Cluster back into log order.

Pure. A node's `head` is the position up to which it routed everything. Each message names
the position the relay's previous message ended at (`prev`) and its own end (`head`).

With partitions (events/relay/bus.py) each partition is its own chain, and the node routes
an update only once every partition has told it, by a message whose `head` is at or past
the update, that it holds nothing earlier (the watermark): so every channel, `all`
included, still gets its events in log order, as PROTOCOL.md promises, and a position a
client resumes from means what it meant with one Redis. A partition that stays behind the
others for `STALL_S` (its shard's connection is lost, its master died) is treated as a gap:
the node fills from the log up to what the others have reached, and goes on.
"""

from __future__ import annotations

from dataclasses import dataclass

from events.ids import ZERO, Position
from events.relay.batch import Batch, Update

STALL_S = 0.5  # a partition behind the others this long has lost messages
MAX_HELD = 20_000  # updates held for a partition behind; past it, they are read from the log


@dataclass(frozen=True, slots=True)
class Plan:
    fill_to: Position | None  # read the log over (head, fill_to] first, when set
    route: list[Update]  # then route these (already past everything filled)


def plan(head: Position, batch: Batch) -> Plan:
    """What to do with `batch` when the node has routed everything up to `head`. A
    heartbeat's `prev` is its `head`, so a lost *last* message shows as a `prev` ahead too;
    a partition's empty message whose `prev` is not ahead is no gap (nothing of it between)."""
    fresh = [u for u in batch.updates if u.position > head]
    if batch.prev > head:
        # Something between head and prev never arrived (lost message, reconnect, late start).
        return Plan(batch.prev, fresh)
    return Plan(None, fresh)


class Merge:
    """The partitions' chains, merged into one stream in log order (module docstring)."""

    def __init__(self, partitions: int) -> None:
        self.seen = [ZERO] * partitions  # per partition: the end of its last message
        self.held: list[Update] = []  # received, waiting for the watermark to pass them
        self.owed: Position | None = None  # fill the log up to here before routing more
        self._waiting_for: Position | None = None  # what every partition must reach...
        self._since = 0.0  # ...and since when (monotonic)

    def offer(self, partition: int, batch: Batch, routed: Position, now: float) -> None:
        """Take one message of `partition`; `routed`: the node's head. Sets `owed` when a
        gap must be filled (a broken chain, or a stalled partition)."""
        decision = plan(max(self.seen[partition], routed), batch)
        self.seen[partition] = max(self.seen[partition], batch.head)
        self.held.extend(decision.route)
        self._owe(decision.fill_to)
        if len(self.held) > MAX_HELD:
            self.held = []
            self._owe(max(self.seen))
        if self._waiting_for is not None and now - self._since >= STALL_S \
                and self.watermark(routed) < self._waiting_for:
            self._owe(max(self.seen))  # a stalled partition: the others' reach, from the log

    def _owe(self, until: Position | None) -> None:
        if until is not None and (self.owed is None or until > self.owed):
            self.owed = until

    def watermark(self, routed: Position) -> Position:
        """Every partition's events up to here have been received or routed."""
        return min(max(s, routed) for s in self.seen)

    def ready(self, routed: Position, now: float) -> tuple[list[Update], Position]:
        """The held updates that may be routed now, in log order, and the watermark (the
        node's new head once they are). Nothing while a fill is owed."""
        if self.owed is not None and self.owed > routed:
            return [], routed
        self.owed = None
        mark = self.watermark(routed)
        ready = sorted((u for u in self.held if routed < u.position <= mark), key=_position)
        self.held = [u for u in self.held if u.position > mark]
        if mark >= max(self.seen):
            self._waiting_for = None
        elif self._waiting_for is None or mark >= self._waiting_for:
            self._waiting_for, self._since = max(self.seen), now
        return ready, max(mark, routed)


def _position(update: Update) -> Position:
    return update.position
