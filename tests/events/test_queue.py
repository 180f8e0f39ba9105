"""The job queue: claims follow priority, then age."""

from __future__ import annotations

from events.log import CreateTask, EventLog
from events.queue import Queue


async def test_claims_take_the_highest_priority_first_then_the_oldest(event_log: EventLog) -> None:
    """Of queued jobs, a claim takes the highest `priority` first; equal ones oldest first."""
    low = await event_log.create(CreateTask(kind="demo", scope="p", priority=-5))
    first_normal = await event_log.create(CreateTask(kind="demo", scope="p"))
    high = await event_log.create(CreateTask(kind="demo", scope="p", priority=7))
    second_normal = await event_log.create(CreateTask(kind="demo", scope="p"))
    queue = Queue(event_log.pool)
    order = []
    for _ in range(4):
        (claim,) = await queue.claim("w", ["demo"], limit=1, lease_s=30)
        order.append(claim.task)
    assert order == [high.task, first_normal.task, second_normal.task, low.task]
