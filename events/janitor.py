"""The janitor: what keeps the queue and the log healthy whoever died, one round at a time.

Each round re-queues jobs whose lease expired (nothing stays `running` forever), times out
tasks past their deadline whose worker died, settles waiting tasks whose dependencies
ended (in case the worker that ended them died before doing it), and trims the history
of ended tasks past retention. Every worker runs rounds (events/worker.py); their queries
re-check their conditions, so concurrent janitors never step on each other. A task that
cannot be timed out or settled is that task's problem: logged, counted, and the round
goes on (invariant 9).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from events import db, decide, deps
from events.errors import Conflict, NotFound, Unavailable
from events.ids import TaskId
from events.kind import KindSpec
from events.log import EventLog
from events.model import Status
from events.queue import Queue
from events.runtime import cleanup_abandoned
from events.sql import q

if TYPE_CHECKING:
    from events.worker import WorkerConfig

log = logging.getLogger("taskcast.janitor")


class Janitor:
    def __init__(self, log_: EventLog, kinds: Mapping[str, KindSpec], config: WorkerConfig, *,
                 worker: str) -> None:
        self.log = log_
        self.queue = Queue(log_.pool)
        self.kinds = kinds
        self.config = config
        self.worker = worker
        self.errors = 0
        self._pruned_at = 0.0

    async def round(self) -> bool:
        """One round; True when it re-queued jobs (a claimer should look). Raises
        Unavailable."""
        requeued = bool(await self.queue.rescue())
        async with db.acquire(self.log.pool) as conn:
            expired = [TaskId(r["id"]) for r in await conn.fetch(q("expired_deadlines"), 100)]
            waiting = [TaskId(r["id"]) for r in await conn.fetch(q("waiting_tasks"), 500)]
        for task in expired:
            await self._each(task, "time out", self._time_out(task))
        for task in waiting:
            await self._each(task, "settle", self._settle(task))
        now = time.monotonic()
        if self.config.retention_s is not None and now - self._pruned_at >= self.config.prune_every_s:
            self._pruned_at = now
            while await self.log.prune(self.config.retention_s) == 1000:
                pass
            async with db.acquire(self.log.pool) as conn:
                await conn.execute(q("prune_traces"), self.config.retention_s)
        return requeued

    async def _each(self, task: TaskId, what: str, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except Unavailable:
            raise
        except Exception:
            log.exception("cannot %s %s", what, task)
            self.errors += 1

    async def _settle(self, task: TaskId) -> None:
        if await deps.settle(self.log, task) is Status.FAILED:
            await deps.release(self.log, [task])

    async def _time_out(self, task: TaskId) -> None:
        """Time out a task whose worker is gone (a live worker times out its own tasks)."""
        view = await self.log.view(task)
        kind = self.kinds.get(view["kind"])
        if kind is not None:
            await cleanup_abandoned(self.log, view, kind, worker=self.worker,
                                    workspace_root=self.config.workspace_root)
        try:
            await self.log.command(task, decide.time_out)
        except (Conflict, NotFound):
            return
        await deps.release(self.log, [task])
