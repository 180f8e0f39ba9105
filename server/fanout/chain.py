"""The gap detector: decides, for each relay message, what a node must fill from the log.

Pure. A node's `head` is the position of the last event it routed. Each message names the
position the relay's previous message ended at (`prev`) and its own end (`head`).
"""

from __future__ import annotations

from dataclasses import dataclass

from events.ids import Position
from events.relay.batch import Batch, Update


@dataclass(frozen=True, slots=True)
class Plan:
    fill_to: Position | None  # read the log over (head, fill_to] first, when set
    route: list[Update]  # then route these (already past everything filled)


def plan(head: Position, batch: Batch) -> Plan:
    """What to do with `batch` when the node has routed everything up to `head`."""
    fresh = [u for u in batch.updates if u.position > head]
    if batch.prev > head:
        # Something between head and prev never arrived (lost message, reconnect, late start).
        return Plan(batch.prev, fresh)
    if not batch.updates and batch.head > head:
        # A heartbeat that is ahead of us: the last message(s) were lost.
        return Plan(batch.head, [])
    return Plan(None, fresh)
