"""The job queue: claim with a lease and a fencing token, heartbeat, rescue.

Lease times are on the database's clock, never a worker's. Every claim and every rescue
raises the job's `fence`; a worker's writes are all conditioned on the fence it claimed
with, so a worker that lost its lease can write nothing (invariant 3).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import asyncpg

from events import db
from events.fold import View
from events.ids import FenceToken, TaskId, encode, position
from events.sql import q

log = logging.getLogger("taskcast.queue")


@dataclass(frozen=True, slots=True)
class Claim:
    task: TaskId
    fence: FenceToken
    attempt: int
    cancel_requested: bool
    view: View


def _positioned(row: asyncpg.Record) -> View:
    """The claimed view; after the claim's `task.started`, at that event's position."""
    view: View = row["view"]
    if row["seq"] is not None:
        view["position"] = encode(position(row["xid"], row["seq"]))
    return view


class Queue:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def claim(self, owner: str, kinds: Sequence[str], *, limit: int, lease_s: float,
                    scope_limit: int | None = None,
                    more: tuple[Sequence[str], int] = ((), 0)) -> list[Claim]:
        """Lease up to `limit` runnable jobs of `kinds` (SKIP LOCKED: claimers never wait
        on each other), and then up to `more`'s limit of its kinds, at most `scope_limit`
        running per scope, and start them: the `task.started` of each task that was
        queued is appended by the same statement (taskcast_claim_start), so a claim and
        its start are one commit and one round trip, whose commit wakes the relay (the
        query's NOTIFY). Raises Unavailable."""
        async with db.acquire(self.pool) as conn:
            with db.translate():
                rows = await conn.fetch(q("claim"), owner, list(kinds), limit, lease_s, scope_limit,
                                        list(more[0]), more[1])
        return [Claim(TaskId(r["task_id"]), FenceToken(r["fence"]), r["attempt"],
                      r["cancel_requested"], _positioned(r)) for r in rows]

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
