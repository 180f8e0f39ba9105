"""Views after each event, for update frames: folds events onto a bounded cache of views.

The relay (and a node filling a gap) reads events, not views; the update frame carries the
task view after its event, which only the fold can give for an event that is not the
task's latest. A cache hit is one `apply`; a miss rebuilds the view from the task's history.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from events.fold import View, apply
from events.ids import TaskId, encode
from events.log import EventLog
from events.model import Event
from events.wire import Update, update


class Projector:
    def __init__(self, log: EventLog, *, max_tasks: int = 20_000) -> None:
        self.log = log
        self.max_tasks = max_tasks
        self._views: OrderedDict[TaskId, View] = OrderedDict()

    async def updates(self, events: Sequence[Event]) -> list[Update]:
        """The encoded update of each event, in order. Raises Unavailable."""
        out: list[Update] = []
        for event in events:
            before = self._views.get(event.task)
            if before is None or before["version"] != event.version - 1:
                before = await self.log.view_before(event.task, event.version - 1)
            view = apply(before, event.task, event.version, event.type, event.data, event.at)
            view["position"] = encode(event.position)
            self._remember(event.task, view)
            out.append(update(event, view))
        return out

    def _remember(self, task: TaskId, view: View) -> None:
        self._views[task] = view
        self._views.move_to_end(task)
        if len(self._views) > self.max_tasks:
            self._views.popitem(last=False)
