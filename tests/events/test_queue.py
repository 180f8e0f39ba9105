"""The job queue: claims follow priority, then age, and read only the kinds they ask for."""

from __future__ import annotations

import asyncio

import asyncpg

from events.log import CreateTask, EventLog
from events.queue import Queue
from tests.plans import explaining, most_discarded


async def _claimed_one_by_one(queue: Queue, kinds: list[str], times: int) -> list[str]:
    """The tasks `times` claims of one job each take, in turn."""
    order = []
    for _ in range(times):
        (claim,) = await queue.claim("w", kinds, limit=1, lease_s=30)
        order.append(claim.task)
    return order


async def test_claims_take_the_highest_priority_first_then_the_oldest(event_log: EventLog) -> None:
    """Of queued jobs, a claim takes the highest `priority` first; equal ones oldest first."""
    low = await event_log.create(CreateTask(kind="demo", scope="p", priority=-5))
    first_normal = await event_log.create(CreateTask(kind="demo", scope="p"))
    high = await event_log.create(CreateTask(kind="demo", scope="p", priority=7))
    second_normal = await event_log.create(CreateTask(kind="demo", scope="p"))
    order = await _claimed_one_by_one(Queue(event_log.pool), ["demo"], 4)
    assert order == [high.task, first_normal.task, second_normal.task, low.task]


async def test_a_claim_of_several_kinds_takes_the_highest_priority_of_any(event_log: EventLog) -> None:
    """Each kind's jobs are read apart, but a claim of two kinds still takes the highest
    `priority` of either first, then the oldest."""
    old = await event_log.create(CreateTask(kind="demo", scope="p"))
    urgent = await event_log.create(CreateTask(kind="other", scope="p", priority=3))
    later = await event_log.create(CreateTask(kind="other", scope="p"))
    order = await _claimed_one_by_one(Queue(event_log.pool), ["demo", "other"], 3)
    assert order == [urgent.task, old.task, later.task]


async def test_a_claim_reads_no_queued_job_of_a_kind_it_does_not_ask_for(
        event_log: EventLog, database_url: str) -> None:
    """Behind a backlog of 300 `demo` jobs, a claim of other kinds (a worker's capped kinds)
    and the search for jobs with a mutex that follows a short claim look at none of them."""
    await asyncio.gather(*(event_log.create(CreateTask(kind="demo", scope="p")) for _ in range(300)))
    conn = await asyncpg.connect(database_url)
    try:
        plans = await explaining(conn)
        assert await conn.fetch("SELECT * FROM taskcast_claim('w', '{shell,git.clone}', 8, 30, NULL)") == []
        assert await conn.fetch("SELECT * FROM taskcast_claim_start('w', '{shell}', 8, 30, NULL)") == []
        assert plans  # the statements were explained
        # (the table is small enough for the plan of the update by key to read all of it)
        assert most_discarded(plans, node="Index Scan") == 0
    finally:
        await conn.close()


async def test_a_claim_locks_no_job_it_does_not_take(event_log: EventLog, database_url: str) -> None:
    """A claim of two kinds that takes one job leaves the other kind's job free: a claim of
    that kind running beside it (another worker, the other lane) gets it."""
    first = await event_log.create(CreateTask(kind="ka", scope="p"))
    other = await event_log.create(CreateTask(kind="kb", scope="p"))
    a, b = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    try:
        async with a.transaction():  # held open while the second claim runs
            taken = await a.fetch("SELECT task_id FROM taskcast_claim('a', '{ka,kb}', 1, 30, NULL)")
            assert [r["task_id"] for r in taken] == [first.task]
            beside = await b.fetch("SELECT task_id FROM taskcast_claim_start('b', '{kb}', 1, 30, NULL)")
            assert [r["task_id"] for r in beside] == [other.task]
    finally:
        await a.close()
        await b.close()


async def test_a_kind_named_twice_is_claimed_once(event_log: EventLog, database_url: str) -> None:
    """Kinds listed twice take each job once, with and without a per-scope limit."""
    tasks = {(await event_log.create(CreateTask(kind="ka", scope="p"))).task for _ in range(4)}
    conn = await asyncpg.connect(database_url)
    try:
        plain = await conn.fetch("SELECT task_id FROM taskcast_claim_start('w', '{ka,ka}', 2, 30, NULL)")
        limited = await conn.fetch("SELECT task_id FROM taskcast_claim_start('w', '{ka,ka}', 2, 30, 100)")
    finally:
        await conn.close()
    claimed = [r["task_id"] for r in [*plain, *limited]]
    assert len(claimed) == 4 and set(claimed) == tasks
