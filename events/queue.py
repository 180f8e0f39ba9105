"""The job queue: claim with a lease and a fencing token, heartbeat, rescue.

Lease times are on the database's clock, never a worker's. Every claim and every rescue
raises the job's `fence`; a worker's writes are all conditioned on the fence it claimed
with, so a worker that lost its lease can write nothing (invariant 3).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from events import db
from events.commit import Append, Stored, append_batch, prepare, view_after
from events.errors import TaskcastError
from events.fold import View
from events.ids import FenceToken, TaskId
from events.model import EventType, NewEvent, Status
from events.sql import q

log = logging.getLogger("taskcast.queue")


_STARTING = frozenset({Status.QUEUED.value, Status.RETRYING.value})


@dataclass(frozen=True, slots=True)
class Claim:
    task: TaskId
    fence: FenceToken
    attempt: int
    cancel_requested: bool
    view: View


def _start(claim: Claim, worker: str) -> Append:
    data = {"worker": worker, "attempt": claim.view.get("attempt", 1)}
    return prepare(claim.task, claim.view, [NewEvent(EventType.TASK_STARTED, data)],
                   datetime.now(UTC), fence=claim.fence)


def _started(claim: Claim, start: Append, written: Stored | TaskcastError) -> Claim:
    """The claim with its view after `task.started`; as it was when that append failed
    (the runner then writes `task.started` itself)."""
    if isinstance(written, TaskcastError):
        log.warning("claimed %s but could not start it in the claim: %s", claim.task, written)
        return claim
    return dataclasses.replace(claim, view=view_after(start, written))


class Queue:
    def __init__(self, pool: asyncpg.Pool, *, on_append: Callable[[], None] | None = None) -> None:
        self.pool = pool
        self.on_append = on_append  # told when a claim wrote events (the relay's wake-up)

    async def claim(self, owner: str, kinds: Sequence[str], *, limit: int, lease_s: float,
                    scope_limit: int | None = None) -> list[Claim]:
        """Lease up to `limit` runnable jobs of `kinds` (SKIP LOCKED: claimers never wait
        on each other), at most `scope_limit` running per scope, and start them: the
        `task.started` of each task that was queued is appended in the claim's transaction,
        so a claim and its start are one commit. Raises Unavailable."""
        async with db.acquire(self.pool) as conn:
            with db.translate():
                async with conn.transaction():
                    rows = await conn.fetch(q("claim"), owner, list(kinds), limit, lease_s, scope_limit)
                    claims = [Claim(TaskId(r["task_id"]), FenceToken(r["fence"]), r["attempt"],
                                    r["cancel_requested"], r["view"]) for r in rows]
                    starts = {c.task: _start(c, owner) for c in claims if c.view["status"] in _STARTING}
                    written = await append_batch(conn, list(starts.values())) if starts else []
        if written and self.on_append is not None:
            self.on_append()
        started = dict(zip(starts, written, strict=True))
        return [_started(c, starts[c.task], started[c.task]) if c.task in started else c for c in claims]

    async def heartbeat(self, leases: Mapping[TaskId, FenceToken], lease_s: float) -> dict[TaskId, bool]:
        """Extend the leases still held, in one statement: each one's cancel flag. A task
        missing from the answer has lost its lease. Raises Unavailable."""
        async with db.acquire(self.pool) as conn:
            with db.translate():
                rows = await conn.fetch(q("heartbeat"), list(leases), list(leases.values()), lease_s)
        return {TaskId(r["task_id"]): bool(r["cancel_requested"]) for r in rows}

    async def hand_back(self, task: TaskId, fence: FenceToken) -> bool:
        """Give back a job this worker holds under `fence` (draining): queued at once, its
        fence raised, idle workers told. False when the lease was no longer ours."""
        async with db.acquire(self.pool) as conn:
            row = await conn.fetchrow(q("hand_back"), task, fence)
            if row is not None:
                await conn.execute("SELECT pg_notify('taskcast_jobs', '')")
        return row is not None

    async def rescue(self) -> list[TaskId]:
        """Re-queue jobs whose lease expired; return their tasks."""
        async with db.acquire(self.pool) as conn:
            rows = await conn.fetch(q("rescue"))
            if rows:
                await conn.execute("SELECT pg_notify('taskcast_jobs', '')")
        return [TaskId(r["task_id"]) for r in rows]
