"""Dependencies: a task with `depends_on` waits until every dependency completed; one that
failed, was cancelled or timed out fails its dependents (with the reason), transitively."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from events import db
from events.decide import Decision
from events.errors import Conflict, NotFound
from events.fold import View
from events.ids import TaskId
from events.log import EventLog
from events.model import EventType, JobChange, NewEvent, Status
from events.sql import q

log = logging.getLogger("taskcast.deps")
E = EventType
_FAILED = {Status.FAILED, Status.CANCELLED, Status.TIMED_OUT}


async def settle(log_: EventLog, task: TaskId) -> Status | None:
    """Queue a waiting task whose dependencies all completed, or fail it when one did not.
    Returns the task's new status when it changed."""
    view = await log_.view(task)
    if view["status"] != Status.WAITING:
        return None
    async with db.acquire(log_.pool) as conn:
        rows = await conn.fetch(q("dependency_statuses"), view["depends_on"])
    statuses = {r["id"]: Status(r["status"]) for r in rows}
    for dep in view["depends_on"]:
        status = statuses.get(dep)
        if status is None or status in _FAILED:
            why = f"dependency {dep} {'does not exist' if status is None else status.value}"
            return await _decide(log_, task, Decision([NewEvent(E.TASK_FAILED, {"error": why})],
                                                      job_state=JobChange.DONE))
    if all(statuses.get(dep) is Status.COMPLETED for dep in view["depends_on"]):
        return await _decide(log_, task, Decision([NewEvent(E.TASK_QUEUED, {})], job_state=JobChange.QUEUED))
    return None


async def _decide(log_: EventLog, task: TaskId, decision: Decision) -> Status | None:
    """Apply `decision` to a task that is still waiting (it may have moved meanwhile)."""
    def guarded(view: View) -> Decision:
        if view["status"] != Status.WAITING:
            raise Conflict("no longer waiting")
        return decision

    try:
        ack = await log_.command(task, guarded)
    except (Conflict, NotFound):
        return None
    return Status(ack.status)


async def release(log_: EventLog, finished: Sequence[TaskId]) -> None:
    """Settle every task waiting on one of `finished`, and theirs in turn when they fail.
    One query per round, however many tasks finished (a worker batches them)."""
    todo = list(finished)
    while todo:
        async with db.acquire(log_.pool) as conn:
            waiting = [TaskId(r["id"]) for r in await conn.fetch(q("waiting_on"), todo)]
        todo = [task for task in waiting if await settle(log_, task) is Status.FAILED]
