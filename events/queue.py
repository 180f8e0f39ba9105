"""The job queue: claim with a lease and a fencing token, heartbeat, rescue.

Lease times are on the database's clock, never a worker's. Every claim and every rescue
raises the job's `fence`; a worker's writes are all conditioned on the fence it claimed
with, so a worker that lost its lease can write nothing (invariant 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from events import db
from events.fold import View
from events.ids import FenceToken, TaskId
from events.sql import q


@dataclass(frozen=True, slots=True)
class Claim:
    task: TaskId
    fence: FenceToken
    attempt: int
    cancel_requested: bool
    view: View


class Queue:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def claim(self, owner: str, kinds: Sequence[str], *, limit: int, lease_s: float,
                    scope_limit: int | None = None) -> list[Claim]:
        """Lease up to `limit` runnable jobs of `kinds` (SKIP LOCKED: claimers never wait
        on each other), at most `scope_limit` running per scope. Raises Unavailable."""
        async with db.acquire(self.pool) as conn:
            rows = await conn.fetch(q("claim"), owner, list(kinds), limit, lease_s, scope_limit)
        return [Claim(TaskId(r["task_id"]), FenceToken(r["fence"]), r["attempt"],
                      r["cancel_requested"], r["view"]) for r in rows]

    async def heartbeat(self, task: TaskId, fence: FenceToken, lease_s: float) -> bool | None:
        """Extend a lease. Returns the cancel flag, or None when the lease is lost."""
        async with db.acquire(self.pool) as conn:
            row = await conn.fetchrow(q("heartbeat"), task, fence, lease_s)
        return None if row is None else bool(row["cancel_requested"])

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
