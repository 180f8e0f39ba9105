"""The projector: each event's update carries the task's view after it, cache or no cache."""

from __future__ import annotations

import asyncpg
import pytest

from events.log import CreateTask, EventLog
from events.model import EventType, NewEvent
from events.relay.projector import Projector

E = EventType


async def _backlog(event_log: EventLog, tasks: int) -> None:
    """`tasks` tasks, each created, started and given a step: three events apiece."""
    for _ in range(tasks):
        ack = await event_log.create(CreateTask("demo", "p"))
        view = await event_log.view(ack.task)
        await event_log.append(ack.task, view, [NewEvent(E.TASK_STARTED, {}),
                                                NewEvent(E.STEP_STARTED, {"step": "a"})])


def _count_rebuilds(event_log: EventLog, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, how many views each batched rebuild of `event_log` asks for."""
    reads: list[int] = []
    views_before = event_log.views_before

    async def counted(versions):  # type: ignore[no-untyped-def]
        reads.append(len(versions))
        return await views_before(versions)

    monkeypatch.setattr(event_log, "views_before", counted)
    return reads


async def test_a_backlog_larger_than_the_cache_gets_the_same_views_from_one_read(
        event_log: EventLog, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight tasks' events read in the middle of each history, through a cache of two
    views: every update equals a fresh projector's that folds the whole log, and the
    views missing from the cache are rebuilt by one read of the log, not one per task."""
    await _backlog(event_log, 8)
    events = await event_log.read_after()
    warm = Projector(event_log)
    expected = await warm.updates(events)
    cold = Projector(event_log, max_tasks=2)
    reads = _count_rebuilds(event_log, monkeypatch)
    later = [e for e in events if e.version > 1]  # the cache never saw these tasks' start
    assert await cold.updates(later) == [u for u, e in zip(expected, events, strict=True) if e.version > 1]
    assert reads == [8]


async def test_a_history_that_cannot_be_folded_degrades_its_own_event_only(
        event_log: EventLog, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One task's stored history breaks the fold (an event written by other means): when
    its view and the others' are rebuilt by one read, only that task's update is degraded,
    and every other one is what a warm projector makes."""
    await _backlog(event_log, 3)
    tasks = list(dict.fromkeys(e.task for e in await event_log.read_after()))
    broken = tasks[1]
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO events (task_id, version, scope, type, data, at) "
                           "VALUES ($1, 4, 'p', 'step.completed', '{}', now())", broken)
        await conn.execute("UPDATE tasks SET version = 4, view = jsonb_set(view, '{version}', '4') "
                           "WHERE id = $1", broken)
    finally:
        await conn.close()
    progress = NewEvent(E.STEP_PROGRESS, {"step": "a", "progress": 0.5})
    for task in tasks:
        view = await event_log.view(task)
        await event_log.append(task, view, [progress])
    events = await event_log.read_after()
    expected = await Projector(event_log).updates(events)
    # Each task's first event here needs the view before it rebuilt; the broken one's
    # history (its version 4) cannot be folded.
    later = [e for e in events if e.version == (5 if e.task == broken else 4)]
    reads = _count_rebuilds(event_log, monkeypatch)
    got = await Projector(event_log, max_tasks=1).updates(later)
    assert got == [u for u, e in zip(expected, events, strict=True) if e in later]
    assert [b'"degraded":true' in u.blob for u in got] == [e.task == broken for e in later]
    assert reads == [3]


async def test_a_queue_longer_than_the_cache_rebuilds_only_the_tasks_past_it(
        event_log: EventLog, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten tasks created before any starts, through a cache of four views, then run one
    after another to their end, each run read as a batch of its own (a drain of a backlog):
    every update equals a warm projector's, and only the six tasks created past the
    cache's size are rebuilt at their start, not every task."""
    created = [await event_log.create(CreateTask("demo", "p")) for _ in range(10)]
    for ack in created:
        view = await event_log.view(ack.task)
        await event_log.append(ack.task, view, [
            NewEvent(E.TASK_STARTED, {}), NewEvent(E.STEP_STARTED, {"step": "a"}),
            NewEvent(E.STEP_COMPLETED, {"step": "a"}), NewEvent(E.TASK_COMPLETED, {})])
    events = await event_log.read_after()
    expected = await Projector(event_log).updates(events)
    small = Projector(event_log, max_tasks=4)
    got = await small.updates([e for e in events if e.version == 1])
    rebuilt = _count_rebuilds(event_log, monkeypatch)
    for ack in created:
        got += await small.updates([e for e in events if e.task == ack.task and e.version > 1])
    assert sorted(got) == sorted(expected)  # each event's once, as a warm projector made it
    assert sum(rebuilt) == 6

