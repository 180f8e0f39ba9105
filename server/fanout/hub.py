"""The fan-out hub: this node's subscriptions, and routing of updates to them.

An update is framed once per channel variant (`task:`, `scope:`, `all`) and the same bytes
are written to every subscribed socket: no task per recipient, no await inside the loop
(a socket that cannot keep up is dealt with by its own bounded buffer, see Connection).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterable
from typing import Protocol

import orjson

from events.ids import ZERO, Position, TaskId
from events.relay.batch import Update
from server.transport import wsframe

MAX_PENDING = 10_000  # updates held for a subscription that is still catching up


class Sink(Protocol):
    """A socket, as the hub sees it."""

    def write_update(self, sub: Subscription, before: Position, frame: bytes) -> None: ...
    def flush(self) -> None: ...
    def resync(self, sub: Subscription) -> None: ...
    def may_read(self, scope: str) -> bool: ...


class Subscription:
    """One channel on one socket. While `pending` is a list the subscription is catching
    up (from the log or a snapshot) and live updates are held there, in order."""

    __slots__ = ("active", "channel", "cursor", "floor", "pending", "scope", "sink")

    def __init__(self, sink: Sink, channel: str, cursor: Position = ZERO, *,
                 scope: str | None = None) -> None:
        self.sink = sink
        self.channel = channel
        self.scope = scope  # the scope a `task:` or `scope:` channel needs (None for `all`)
        self.cursor = cursor  # updates at or before this position were delivered
        self.floor: dict[TaskId, int] = {}  # per task: versions at or below were delivered
        self.pending: list[tuple[Update, bytes]] | None = []
        self.active = True

    def offer(self, update: Update, frame: bytes) -> None:
        if not self.active:
            return
        if self.pending is not None:
            if len(self.pending) >= MAX_PENDING:
                self.pending = None
                self.sink.resync(self)
                return
            self.pending.append((update, frame))
            return
        self.deliver(update, frame)

    def deliver(self, update: Update, frame: bytes) -> None:
        """Write `update` unless it was delivered already (catch-up and live overlap)."""
        if update.position <= self.cursor:
            return
        if self.floor:
            floor = self.floor.get(update.task)
            if floor is not None:
                if update.version <= floor:
                    return
                del self.floor[update.task]
        before, self.cursor = self.cursor, update.position
        self.sink.write_update(self, before, frame)

    def go_live(self) -> None:
        """Deliver what was held during catch-up, then pass updates straight through."""
        held, self.pending = self.pending or [], None
        for update, frame in held:
            self.deliver(update, frame)


def channel_of_task(task: str) -> str:
    return f"task:{task}"


class Hub:
    def __init__(self) -> None:
        self.by_task: dict[str, set[Subscription]] = {}
        self.by_scope: dict[str, set[Subscription]] = {}
        self.everything: set[Subscription] = set()
        self.head: Position = ZERO  # the last position routed
        self.routed = 0
        self._dirty: list[Sink] = []  # sockets with queued updates
        self._flush_scheduled = False

    def mark_dirty(self, sink: Sink) -> None:
        """`sink` queued updates: flush it after the current routing (or soon, when the
        updates came from elsewhere, e.g. a catch-up)."""
        self._dirty.append(sink)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write every socket's queued updates, one write per socket."""
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        for sink in dirty:
            sink.flush()

    def add(self, sub: Subscription) -> None:
        kind, _, name = sub.channel.partition(":")
        if kind == "task":
            self.by_task.setdefault(name, set()).add(sub)
        elif kind == "scope":
            self.by_scope.setdefault(name, set()).add(sub)
        else:
            self.everything.add(sub)

    def remove(self, sub: Subscription) -> None:
        sub.active = False
        kind, _, name = sub.channel.partition(":")
        table = self.by_task if kind == "task" else self.by_scope if kind == "scope" else None
        if table is None:
            self.everything.discard(sub)
            return
        subs = table.get(name)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del table[name]

    def route(self, updates: Iterable[Update]) -> None:
        """Offer each update to the subscriptions of its task, its scope, and `all`.

        The cyclic garbage collector is paused meanwhile: routing allocates a small tuple per
        delivery, all freed by reference counting, and at a few hundred thousand deliveries
        a second collections triggered by those allocations took half the node's CPU.
        """
        collecting = gc.isenabled()
        gc.disable()
        try:
            self._route(updates)
        finally:
            if collecting:
                gc.enable()

    def _route(self, updates: Iterable[Update]) -> None:
        for update in updates:
            if update.position <= self.head:
                continue
            self.head = update.position
            self.routed += 1
            subs = self.by_task.get(update.task)
            if subs:
                _offer(subs, update, frame(f"task:{update.task}", update))
            subs = self.by_scope.get(update.scope)
            if subs:
                _offer(subs, update, frame(f"scope:{update.scope}", update))
            if self.everything:
                allowed = [s for s in self.everything if s.sink.may_read(update.scope)]
                if allowed:
                    _offer(allowed, update, frame("all", update))
        self.flush()

    def advance(self, head: Position) -> None:
        """Everything up to `head` was routed (some positions carried nothing for this node)."""
        self.head = max(self.head, head)

    def subscription_count(self) -> int:
        return (sum(len(s) for s in self.by_task.values())
                + sum(len(s) for s in self.by_scope.values()) + len(self.everything))


def _offer(subs: Iterable[Subscription], update: Update, framed: bytes) -> None:
    for sub in list(subs):
        sub.offer(update, framed)


def frame(channel: str, update: Update) -> bytes:
    """The complete websocket frame of `update` on `channel`."""
    return wsframe.text(b'{"type":"update","channel":' + orjson.dumps(channel) + update.blob)
