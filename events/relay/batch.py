"""The relay's Redis message: a chained batch of pre-encoded updates.

    <header JSON>\n<blob><blob>...

header = {"prev": P0, "head": P, "events": [[position, task, scope, version, blob_len], ...]}
where positions are wire strings. Each blob is the tail of an `update` frame,
`,"position":"..","event":{..},"task":{..}}`, so a node builds the frame for a channel by
prefixing `{"type":"update","channel":"<C>"` and never decodes or re-encodes an event.

`prev` names the position the previous message ended at: a node whose own head differs has
missed something and fills the gap from the log (invariant 1). A message without events is
the relay's heartbeat: its `head` lets a node notice a lost *last* message.

With partitions (a Redis Cluster, events/relay/bus.py) each relay batch becomes one message
per partition, `encode_parts`: the same `prev` and `head`, and that partition's events
only. `prev` chains each partition's messages, and an empty part still says "this
partition has nothing else up to `head`".
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import orjson

from events.fold import MAX_COMPACT_BYTES, View, compact, minimal
from events.ids import Position, TaskId, decode, encode
from events.model import Event


class Update(NamedTuple):
    """One event as a node routes it. A named tuple, as `events.model.Event` is: built once
    per event by the relay and again by every node."""

    position: Position
    task: TaskId
    scope: str
    version: int
    blob: bytes  # the frame's tail, see the module docstring


@dataclass(frozen=True, slots=True)
class Batch:
    prev: Position
    head: Position
    updates: list[Update]
    sent_at: float = 0.0  # the relay's wall clock when it published (for the lag gauge)


def update(event: Event, view: View, wire: str | None = None) -> Update:
    """Encode one event and the (compact, bounded) view after it (`wire`: the event's
    position encoded, when the caller has it). Raises what orjson raises for a value it
    cannot encode (the projector degrades that event)."""
    task = orjson.dumps(compact(view))
    if len(task) > MAX_COMPACT_BYTES:
        task = orjson.dumps(minimal(view))
    return _update(event, orjson.dumps(event.wire()), task, wire)


def degraded(event: Event) -> Update:
    """The update of an event that cannot be folded or encoded (stored before the edge
    checked everything, or written by hand): its identity only, `"degraded": true` on the
    event and the view, so the version chain stays whole and a client can tell; `history`
    has what is readable of it. Built from ints and strings alone: it always encodes."""
    event_wire = {"task": event.task, "version": event.version, "type": str(event.type),
                  "at": event.at, "data": {}, "degraded": True}
    view = {"id": event.task, "scope": event.scope, "version": event.version,
            "position": encode(event.position), "degraded": True}
    return _update(event, orjson.dumps(event_wire), orjson.dumps(view))


def _update(event: Event, event_json: bytes, task_json: bytes, wire: str | None = None) -> Update:
    blob = (b',"position":"' + (wire or encode(event.position)).encode() + b'","event":' + event_json
            + b',"task":' + task_json + b"}")
    return Update(event.position, event.task, event.scope, event.version, blob)


def encode_batch(prev: Position, updates: Sequence[Update], head: Position | None = None,
                 sent_at: float = 0.0) -> bytes:
    """A Redis message. `head` defaults to the last update's position (or `prev`)."""
    if head is None:
        head = updates[-1].position if updates else prev
    header = {"prev": encode(prev), "head": encode(head), "at": sent_at,
              "events": [[encode(u.position), u.task, u.scope, u.version, len(u.blob)]
                         for u in updates]}
    return b"".join([orjson.dumps(header), b"\n", *(u.blob for u in updates)])


def partition_of(scope: str, partitions: int) -> int:
    """The partition of a scope's events: stable across processes and versions (not `hash()`)."""
    return zlib.crc32(scope.encode()) % partitions


def encode_parts(prev: Position, updates: Sequence[Update], head: Position, partitions: int,
                 sent_at: float = 0.0) -> list[bytes]:
    """The messages of one relay batch, one per partition (see the module docstring)."""
    if partitions == 1 or not updates:
        return [encode_batch(prev, updates, head, sent_at)] * partitions
    parts: list[list[Update]] = [[] for _ in range(partitions)]
    for u in updates:
        parts[partition_of(u.scope, partitions)].append(u)
    return [encode_batch(prev, part, head, sent_at) for part in parts]


def decode_batch(message: bytes) -> Batch:
    """Parse a Redis message. Raises ValueError when it is not one."""
    cut = message.find(b"\n")
    if cut < 0:
        raise ValueError("no header")
    header = orjson.loads(message[:cut])
    updates: list[Update] = []
    offset = cut + 1
    for pos, task, scope, version, size in header["events"]:
        updates.append(Update(decode(pos), TaskId(task), scope, version,
                              message[offset:offset + size]))
        offset += size
    if offset != len(message):
        raise ValueError("blob lengths do not add up")
    return Batch(decode(header["prev"]), decode(header["head"]), updates, float(header.get("at", 0.0)))
