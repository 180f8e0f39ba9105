"""The event log: commit-ordered reads, gapless versions, optimistic concurrency, fencing."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from events import db
from events.clock import SystemClock, iso
from events.commit import Append, append_batch
from events.errors import IllegalTransition, NotFound, StaleFence, VersionConflict
from events.fold import View, apply
from events.ids import ZERO, Position, TaskId, position, split
from events.log import CreateTask, EventLog
from events.model import EventType, NewEvent
from events.queue import Queue
from tests.foreign import foreign_writes
from tests.waiting import eventually_async

E = EventType


async def _created(log: EventLog, n: int = 1, scope: str = "project:1") -> list[TaskId]:
    return [(await log.create(CreateTask("demo", scope))).task for _ in range(n)]


async def _append_slowly(conn: asyncpg.Connection, log: EventLog, task: TaskId, view: View,
                         event: NewEvent, delay_s: float) -> View:
    """Append inside an explicit transaction that waits `delay_s` before committing."""
    now = SystemClock().now()
    new = apply(view, task, view["version"] + 1, event.type, event.data, "t")
    async with conn.transaction():
        written = await append_batch(conn, [Append(task, view["version"], new, [event], now)])
        assert isinstance(written[0], list)
        await asyncio.sleep(delay_s)
    return new


async def test_a_naive_sequence_reader_skips_a_late_commit_and_the_log_reader_does_not(
        event_log: EventLog, database_url: str) -> None:
    """Invariant 4: a transaction that takes a sequence number first but commits last is
    skipped by `seq > P`, never by the log's bounded read, which meanwhile waits for nothing
    else: foreign write transactions (this database, another one) stay open throughout."""
    a, b = await _created(event_log, 2)
    cursor = max([(await event_log.history(t))[-1].position for t in (a, b)])
    naive_cursor = await _max_seq(database_url)
    slow, fast = await db.connect(database_url), await db.connect(database_url)
    try:
        async with foreign_writes(database_url):
            view_a, view_b = await event_log.view(a), await event_log.view(b)
            started = NewEvent(E.TASK_STARTED, {})
            slow_commit = asyncio.create_task(_append_slowly(slow, event_log, a, view_a, started, 0.5))
            await eventually_async(lambda: _writing(event_log), within=5, poll_s=0.01)
            await _append_slowly(fast, event_log, b, view_b, started, 0)

            naive_seen = await _naive_read(database_url, naive_cursor)
            log_seen = await event_log.read_after(cursor)
            assert [r["task_id"] for r in naive_seen] == [b]  # b is visible, a not yet
            assert log_seen == []  # the log reader waits: a's xid is below b's and still open
            naive_cursor = max(r["seq"] for r in naive_seen)

            await slow_commit
            naive_later = await _naive_read(database_url, naive_cursor)
            assert naive_later == []  # a's event is behind the naive cursor: lost for good
            # Both at once, with the foreign transactions still open (invariant 10).
            assert [e.task for e in await event_log.read_after(cursor)] == [a, b]
    finally:
        await slow.close()
        await fast.close()


async def _writing(log: EventLog, count: int = 1) -> bool:
    """Whether `count` taskcast writers are in flight with a transaction id."""
    return sum(w.xid is not None for w in (await log.bound()).writers) >= count


async def _max_seq(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT coalesce(max(seq), 0) FROM events"))
    finally:
        await conn.close()


async def _naive_read(url: str, after_seq: int) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(
            "SELECT seq, task_id FROM events WHERE seq > $1 ORDER BY seq", after_seq))
    finally:
        await conn.close()


async def test_eight_concurrent_writers_and_a_tailing_reader(event_log: EventLog, database_url: str) -> None:
    """Invariants 4 and 10 under load: 8 writers with random delays before commit; a reader
    tailing "after P" sees every committed event exactly once, each task's versions in order,
    all while foreign write transactions (this database, another one) stay open."""
    tasks = await _created(event_log, 8)
    # Start after the creates (head() could be older: it stops below any open transaction).
    start = max([(await event_log.history(t))[-1].position for t in tasks])
    written: list[Position] = []
    rng = random.Random(7)

    async def writer(task: TaskId) -> None:
        conn = await db.connect(database_url)
        try:
            view = await event_log.view(task)
            view = await _append_slowly(conn, event_log, task, view, NewEvent(E.TASK_STARTED, {}), 0)
            for i in range(25):
                event = NewEvent(E.STEP_PROGRESS if i else E.STEP_STARTED,
                                 {"step": "s", "progress": i / 25})
                view = await _append_slowly(conn, event_log, task, view, event, rng.random() * 0.02)
        finally:
            await conn.close()

    seen: list[Any] = []
    last = asyncio.get_running_loop().create_future()

    async def reader() -> None:
        # Tails until it has read the newest event written (an empty read only means that
        # a taskcast writer older than the next event is still in flight).
        cursor = start
        while not (last.done() and cursor >= last.result()):
            events = await event_log.read_after(cursor, limit=50)
            seen.extend(events)
            if events:
                cursor = events[-1].position
            else:
                await asyncio.sleep(0.002)

    async with foreign_writes(database_url):
        tail = asyncio.create_task(reader())
        await asyncio.gather(*(writer(t) for t in tasks))
        conn = await asyncpg.connect(database_url)
        try:
            xid, seq = split(start)
            rows = await conn.fetch("SELECT xid, seq FROM events WHERE (xid, seq) > ($1::xid8, $2) "
                                    "ORDER BY xid, seq", xid, seq)
            written = [position(r["xid"], r["seq"]) for r in rows]
        finally:
            await conn.close()
        last.set_result(written[-1])
        await asyncio.wait_for(tail, 10)  # caught up before the foreign transactions commit
    positions = [e.position for e in seen]
    assert positions == written  # every event, once, in position order
    assert len(written) == 8 * 26
    for task in tasks:
        assert [e.version for e in seen if e.task == task] == list(range(2, 28))


async def test_two_appends_at_the_same_version_one_wins(event_log: EventLog) -> None:
    """Optimistic concurrency: of two appends expecting the same version, one commits and
    the other gets VersionConflict; nothing is overwritten."""
    (task,) = await _created(event_log)
    view = await event_log.view(task)
    results = await asyncio.gather(
        event_log.append(task, view, [NewEvent(E.TASK_CANCELLED, {"reason": "a"})]),
        event_log.append(task, view, [NewEvent(E.TASK_STARTED, {})]),
        return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["VersionConflict", "tuple"]
    history = await event_log.history(task)
    assert [e.version for e in history] == [1, 2]


async def test_an_illegal_transition_writes_nothing(event_log: EventLog) -> None:
    """The FSM is checked at append time: completing a queued task is refused."""
    (task,) = await _created(event_log)
    view = await event_log.view(task)
    with pytest.raises(IllegalTransition):
        await event_log.append(task, view, [NewEvent(E.TASK_COMPLETED, {"result": 1})])
    assert [e.type for e in await event_log.history(task)] == [E.TASK_CREATED]


async def test_appending_to_a_missing_task_is_not_found(event_log: EventLog) -> None:
    """An append names an existing task."""
    (task,) = await _created(event_log)
    view = {**await event_log.view(task), "id": "tsk_missing"}
    with pytest.raises(NotFound):
        await event_log.append(TaskId("tsk_missing"), view, [NewEvent(E.TASK_STARTED, {})])


async def test_a_superseded_fence_cannot_append_even_one_event(
        event_log: EventLog, database_url: str) -> None:
    """Invariant 3: once a worker's lease expired and another claimed the task, the first
    worker's appends are refused in the same transaction; the new owner's all land."""
    (task,) = await _created(event_log)
    queue = Queue(event_log.pool)
    (first,) = await queue.claim("worker-a", ["demo"], limit=1, lease_s=30)
    view = first.view  # the claim appended task.started in its own transaction
    assert view["status"] == "running" and view["version"] == 2

    conn = await asyncpg.connect(database_url)
    try:  # worker-a is paused past its lease
        await conn.execute("UPDATE jobs SET lease_expires_at = now() - interval '1 second'")
    finally:
        await conn.close()
    assert await queue.rescue() == [task]
    (second,) = await queue.claim("worker-b", ["demo"], limit=1, lease_s=30)
    assert second.fence > first.fence

    step = NewEvent(E.STEP_STARTED, {"step": "one"})
    with pytest.raises(StaleFence):
        await event_log.append(task, view, [step], fence=first.fence)
    new_view, _ = await event_log.append(task, second.view, [step], fence=second.fence)
    with pytest.raises((StaleFence, VersionConflict)):
        await event_log.append(task, new_view, [NewEvent(E.STEP_COMPLETED, {"step": "one"})],
                               fence=first.fence)
    assert [(e.version, e.type) for e in await event_log.history(task)] == [
        (1, E.TASK_CREATED), (2, E.TASK_STARTED), (3, E.STEP_STARTED)]
    assert await queue.heartbeat({task: first.fence}, 30) == {}  # lost
    assert await queue.heartbeat({task: second.fence}, 30) == {task: False}


async def test_an_expired_lease_cannot_append_before_anyone_reclaims(event_log: EventLog,
                                                                    database_url: str) -> None:
    """Invariant 3: an expired lease alone (no rescue yet) already stops the worker."""
    (task,) = await _created(event_log)
    (claim,) = await Queue(event_log.pool).claim("w", ["demo"], limit=1, lease_s=30)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE jobs SET lease_expires_at = now() - interval '1 second'")
    finally:
        await conn.close()
    with pytest.raises(StaleFence):
        await event_log.append(task, claim.view, [NewEvent(E.STEP_STARTED, {"step": "a"})],
                               fence=claim.fence)
    assert len(await event_log.history(task)) == 2  # task.created, and the claim's task.started


async def test_create_with_a_key_twice_returns_the_first_ack(event_log: EventLog) -> None:
    """Invariant 7: the same key from the same principal creates one task; another principal's
    identical key is its own."""
    first = await event_log.create(CreateTask("demo", "project:1"), principal="p", key="k1")
    again = await event_log.create(CreateTask("demo", "project:1"), principal="p", key="k1")
    other = await event_log.create(CreateTask("demo", "project:1"), principal="q", key="k1")
    assert again.duplicate and not first.duplicate and not other.duplicate
    assert (again.task, again.position, again.status) == (first.task, first.position, first.status)
    assert other.task != first.task


async def test_concurrent_creates_with_one_key_make_one_task(event_log: EventLog) -> None:
    """Invariant 7 under a race: ten concurrent creates with one key make exactly one task."""
    acks = await asyncio.gather(*(event_log.create(CreateTask("demo", "s"), principal="p", key="race")
                                  for _ in range(10)))
    assert len({a.task for a in acks}) == 1
    assert sum(not a.duplicate for a in acks) == 1


async def test_reads_after_a_position_filter_by_task_and_scope(event_log: EventLog) -> None:
    """read_after serves the three channel kinds: a task, a scope, everything."""
    a, b = await _created(event_log, 2, scope="project:1")
    (c,) = await _created(event_log, 1, scope="project:2")

    async def visible() -> bool:  # (another transaction on the server may hold xmin back)
        return len(await event_log.read_after(ZERO)) == 3

    await eventually_async(visible)
    assert [e.task for e in await event_log.read_after(ZERO)] == [a, b, c]
    assert [e.task for e in await event_log.read_after(ZERO, scope="project:2")] == [c]
    assert [e.task for e in await event_log.read_after(ZERO, task=b)] == [b]


async def test_retention_trims_ended_tasks_and_keeps_their_views(event_log: EventLog) -> None:
    """Retention deletes the history of ended tasks but their last event, so views, positions
    and later reads still work; the floor moves past what was deleted."""
    (done, running) = await _created(event_log, 2)
    view = await event_log.view(done)
    await event_log.append(done, view, [NewEvent(E.TASK_CANCELLED, {"reason": "x"})])
    view = await event_log.view(running)
    await event_log.append(running, view, [NewEvent(E.TASK_STARTED, {})])
    before = await event_log.view(done)
    assert await event_log.retention_floor() == ZERO

    assert await event_log.prune(0) == 1
    assert await event_log.prune(0) == 0  # each task is trimmed once
    assert [e.version for e in await event_log.history(done)] == [2]
    assert len(await event_log.history(running)) == 2
    assert await event_log.view(done) == before
    floor = await event_log.retention_floor()
    assert floor > ZERO and floor < (await event_log.history(done))[0].position
    rebuilt = await event_log.view_before(done, 2)
    assert rebuilt is not None and rebuilt["status"] == "cancelled"


def test_a_time_is_written_in_utc_to_the_millisecond_whatever_its_zone() -> None:
    """The protocol's timestamps: one instant reads the same from any zone, cut to milliseconds."""
    moment = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert {iso(moment), iso(moment.astimezone(timezone(timedelta(hours=-5)))),
            iso(moment.astimezone(ZoneInfo("Europe/Paris"))), iso(moment.replace(tzinfo=ZoneInfo("UTC")))
            } == {"2026-01-02T03:04:05.678Z"}
