"""Views after each event, for update frames: folds events onto a bounded cache of views.

The relay (and a node filling a gap) reads events, not views; the update frame carries the
task view after its event, which only the fold can give for an event that is not the
task's latest. A cache hit is one `apply`; a miss rebuilds the view from the task's history.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import ClassVar

from events.errors import Unavailable
from events.fold import View, apply
from events.ids import TaskId, encode
from events.log import EventLog
from events.model import TERMINAL, Event
from events.relay.batch import Update, degraded, update

log = logging.getLogger("taskcast.projector")


class Projector:
    degraded_total: ClassVar[int] = 0  # in this process, for /metrics (relay and node alike)

    def __init__(self, log: EventLog, *, max_tasks: int = 20_000) -> None:
        self.log = log
        self.max_tasks = max_tasks
        self._views: OrderedDict[TaskId, View] = OrderedDict()
        self.degraded = 0  # events that could not be folded or encoded (their own problem)

    async def updates(self, events: Sequence[Event]) -> list[Update]:
        """The encoded update of each event, in order. An event that cannot be folded or
        encoded is that event's problem (invariant 9): logged, counted, and sent in its
        degraded form (events.wire.degraded), never an error that would stop the relay's
        or the node's loop for every other task. Raises Unavailable (nothing is lost: the
        caller reads the same events again)."""
        out: list[Update] = []
        rebuilt = await self._misses(events)
        for event in events:
            try:
                before = self._views.get(event.task)
                if before is None or before["version"] != event.version - 1:
                    if event.task in rebuilt:  # the task's first event here: rebuilt for it
                        before = rebuilt.pop(event.task)
                    else:
                        before = await self.log.view_before(event.task, event.version - 1)
                view = apply(before, event.task, event.version, event.type, event.data, event.at)
                view["position"] = wire = encode(event.position)
                encoded = update(event, view, wire)
            except Unavailable:
                raise
            except Exception as exc:
                self.degraded += 1
                Projector.degraded_total += 1
                self._views.pop(event.task, None)
                log.error("event %s of task %s (version %d) cannot be delivered whole, sending it "
                          "degraded: %r", encode(event.position), event.task, event.version, exc)
                out.append(degraded(event))
                continue
            self._remember(event.task, view)
            out.append(encoded)
        return out

    async def _misses(self, events: Sequence[Event]) -> dict[TaskId, View | None]:
        """The views the cache lacks for `events`, rebuilt with one read (not one per task:
        a backlog larger than the cache misses on every task)."""
        wanted: dict[TaskId, int] = {}
        seen: set[TaskId] = set()
        for event in events:
            if event.task in seen:  # later events of a task follow from its first
                continue
            seen.add(event.task)
            cached = self._views.get(event.task)
            if cached is None or cached["version"] != event.version - 1:
                wanted[event.task] = event.version - 1
        return await self.log.views_before(wanted) if wanted else {}

    def _remember(self, task: TaskId, view: View) -> None:
        """Keep `view` for the task's next event. Tasks leave the cache as they end (an
        ended task has no next event), and when it is full a task just created waits
        outside it, rebuilt from its one event when it starts: a queue runs its tasks in
        about the order they came, so the ones the cache holds, created earlier, are the
        ones needed next. A least recently used eviction would make way for each new task
        by dropping the oldest queued one, and past a backlog of `max_tasks` every task
        would miss at its start."""
        if view["status"] in TERMINAL:
            self._views.pop(task, None)
            return
        if task not in self._views and len(self._views) >= self.max_tasks:
            if view["version"] == 1:
                return
            self._views.popitem(last=False)
        self._views[task] = view
        self._views.move_to_end(task)
