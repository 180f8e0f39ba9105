"""The read bound: only taskcast's announced writers hold it (invariant 10), and a stalled
writer delays only what comes after it (invariant 4)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from cli.process import Process
from events import db
from events.bound import XID_EPOCH, Writer, compute, widen
from events.clock import SystemClock
from events.commit import Append, append_batch
from events.fold import View, apply
from events.ids import TaskId
from events.log import CreateTask, EventLog
from events.model import EventType, NewEvent
from events.sql import q
from tests.foreign import foreign_write, foreign_writes
from tests.scraping import get

E = EventType


def test_widen_is_the_identity_in_the_same_epoch() -> None:
    """A 32-bit xid near x0, in x0's epoch, keeps x0's epoch, above or below x0."""
    near = 7 * XID_EPOCH + 1000
    assert widen(1000, near) == near
    assert widen(900, near) == near - 100
    assert widen(1100, near) == near + 100


def test_widen_crosses_the_epoch_boundary_both_ways() -> None:
    """Just after a wraparound, an xid from the end of the previous epoch is in that epoch;
    just before one, an xid from the start of the next epoch is in the next."""
    after = 3 * XID_EPOCH + 5
    assert widen(XID_EPOCH - 10, after) == 3 * XID_EPOCH - 10
    before = 3 * XID_EPOCH - 5
    assert widen(4, before) == 3 * XID_EPOCH + 4
    assert widen(XID_EPOCH // 2, 0) == -(XID_EPOCH // 2)  # the tie goes below
    with pytest.raises(ValueError):
        widen(XID_EPOCH, before)


async def test_the_one_trip_read_widens_xids_as_the_bound_does(database_url: str) -> None:
    """The bound taskcast_read_after computes in SQL widens a writer's 32-bit xid as
    events.bound.widen does: in its epoch, and across the boundary both ways."""
    cases = [(1000, 7 * XID_EPOCH + 1000), (900, 7 * XID_EPOCH + 1000), (1100, 7 * XID_EPOCH + 1000),
             (XID_EPOCH - 10, 3 * XID_EPOCH + 5), (4, 3 * XID_EPOCH - 5),
             (XID_EPOCH // 2, 5 * XID_EPOCH), (XID_EPOCH // 2 - 1, 5 * XID_EPOCH)]
    conn = await asyncpg.connect(database_url)
    try:
        widened = [int(await conn.fetchval("SELECT taskcast_widen($1::text::xid, $2::text::xid8)::text",
                                           str(xid), str(near))) for xid, near in cases]
    finally:
        await conn.close()
    assert widened == [widen(xid, near) for xid, near in cases]


def test_the_bound_is_the_oldest_writer_capped_by_x0() -> None:
    """min(x0, writers' xids); a writer without an xid, or newer than x0, does not hold it."""
    x0 = 2 * XID_EPOCH + 500
    bound = compute(x0, x0 - 9000, [(11, 480, 2.5), (12, None, 0.1), (13, 490, 0.2), (14, 600, 0.0)])
    assert bound.xid == 2 * XID_EPOCH + 480 and bound.lag_xids == 20
    assert bound.holder == Writer(11, 2 * XID_EPOCH + 480, 2.5)
    idle = compute(x0, x0 - 9000, [(None, None, None)])
    assert (idle.xid, idle.holder, idle.lag_xids, idle.writers) == (x0, None, 0, ())
    assert compute(x0, x0, [(12, None, 0.1), (14, 600, 0.0)]).holder is None


async def _begin_append(conn: asyncpg.Connection, log: EventLog, task: TaskId) -> None:
    """BEGIN and append `task.started` through taskcast_append_batch, leaving the transaction open:
    a taskcast writer stalled mid-transaction (announced, xid assigned, not committed)."""
    view: View = await log.view(task)
    new = apply(view, task, view["version"] + 1, E.TASK_STARTED, {}, "t")
    await conn.execute("BEGIN")
    written = await append_batch(conn, [Append(task, view["version"], new, [NewEvent(E.TASK_STARTED, {})],
                                               SystemClock().now())])
    assert isinstance(written[0], list)


@pytest.mark.parametrize("ending", ["COMMIT", "ROLLBACK"])
async def test_a_stalled_writer_delays_only_positions_after_its_own(
        event_log: EventLog, database_url: str, ending: str) -> None:
    """A writer open mid-transaction holds back only later writers' events (not an older
    writer's, nor anything because of older foreign transactions); when it commits or aborts
    the reader continues from its last position and skips nothing."""
    a, s, c = [(await event_log.create(CreateTask("demo", "p"))).task for _ in range(3)]
    cursor = max([(await event_log.history(t))[-1].position for t in (a, s, c)])
    older, stalled = await db.connect(database_url), await db.connect(database_url)
    try:
        async with foreign_writes(database_url):  # older than every write below
            await _begin_append(older, event_log, a)
            await _begin_append(stalled, event_log, s)
            await older.execute("COMMIT")  # an older writer, committed after the stall began
            await event_log.append(c, await event_log.view(c), [NewEvent(E.TASK_STARTED, {})])

            first = await event_log.read_after(cursor)
            assert [e.task for e in first] == [a]  # c waits behind the stalled writer
            bound = await event_log.bound()
            assert bound.holder is not None and bound.holder.pid == stalled.get_server_pid()
            assert await event_log.events_behind(bound) == 1  # c

            await stalled.execute(ending)
            rest = await event_log.read_after(first[-1].position)
        expected = [s, c] if ending == "COMMIT" else [c]
        assert [e.task for e in rest] == expected
        everything = await event_log.read_after(cursor)
        assert [e.position for e in everything] == [e.position for e in first + rest]
    finally:
        await older.close()
        await stalled.close()


async def test_the_writers_xid_widens_to_its_xid8(event_log: EventLog, database_url: str) -> None:
    """The bound's writer carries the very xid8 its events get (32-bit backend_xid widened)."""
    (task,) = [(await event_log.create(CreateTask("demo", "p"))).task]
    conn = await db.connect(database_url)
    try:
        await _begin_append(conn, event_log, task)
        own = int(await conn.fetchval("SELECT pg_current_xact_id()::text"))
        writers = {w.pid: w for w in (await event_log.bound()).writers}
        assert writers[conn.get_server_pid()].xid == own
        await conn.execute("ROLLBACK")
    finally:
        await conn.close()
    assert not (await event_log.bound()).writers


async def test_any_insert_into_events_announces_itself_or_fails(event_log: EventLog,
                                                                database_url: str) -> None:
    """Invariant 10 is enforced by the database: a plain INSERT into events announces its
    transaction (the trigger); one whose transaction already has an xid is refused, since
    announcing then could let a reader's bound pass it."""
    (task,) = [(await event_log.create(CreateTask("demo", "p"))).task]
    conn = await db.connect(database_url)
    insert = ("INSERT INTO events (task_id, version, scope, type, data, at) "
              "VALUES ($1, 99, 'p', 'step.progress', '{}', now())")
    try:
        await conn.execute("BEGIN")
        await conn.execute(insert, task)
        assert conn.get_server_pid() in {w.pid for w in (await event_log.bound()).writers}
        await conn.execute("ROLLBACK")

        async with foreign_write(database_url):  # (creates app_orders)
            pass
        await conn.execute("BEGIN")
        await conn.execute("INSERT INTO app_orders (note) VALUES ('first')")  # xid assigned
        with pytest.raises(asyncpg.PostgresError) as raised:
            await conn.execute(insert, task)
        assert raised.value.sqlstate == "TCW01"
        await conn.execute("ROLLBACK")
    finally:
        await conn.close()


async def test_the_bound_refuses_repeatable_read(database_url: str) -> None:
    """Under REPEATABLE READ a later read would reuse the snapshot taken before the writers
    were read, so the bound refuses to be computed there."""
    conn = await db.connect(database_url)
    try:
        async with conn.transaction(isolation="repeatable_read"):
            with pytest.raises(asyncpg.PostgresError) as raised:
                await conn.fetch(q("writers"))
        assert raised.value.sqlstate == "TCW02"
    finally:
        await conn.close()


async def test_metrics_show_the_bound_lag_and_the_writer_holding_it(
        launch: Callable[..., Awaitable[Process]], database_url: str) -> None:
    """/metrics says how far the bound is behind the head and which taskcast writer holds it
    (pid, xid, age), and that foreign transactions only move the cluster's xmin."""
    process = await launch(workers=0)
    log = process.log
    held, later = [(await log.create(CreateTask("demo", "p"))).task for _ in range(2)]
    stalled = await db.connect(database_url)
    try:
        async with foreign_writes(database_url):
            await _begin_append(stalled, log, held)
            xid = int(await stalled.fetchval("SELECT pg_current_xact_id()::text"))
            await log.append(later, await log.view(later), [NewEvent(E.TASK_STARTED, {})])
            gauges = _gauges((await get(process.settings.port, "/metrics"))[1])
            assert gauges["taskcast_read_bound_holder_pid"] == stalled.get_server_pid()
            assert gauges["taskcast_read_bound_holder_xid"] == xid
            assert gauges["taskcast_read_bound_holder_age_seconds"] > 0
            assert gauges["taskcast_read_bound_events_behind"] == 1
            assert gauges["taskcast_read_bound_lag_xids"] >= 2  # the stalled one and `later`
            assert gauges["taskcast_cluster_xmin_lag_xids"] > gauges["taskcast_read_bound_lag_xids"]
            await stalled.execute("ROLLBACK")
            gauges = _gauges((await get(process.settings.port, "/metrics"))[1])
            assert gauges["taskcast_read_bound_holder_pid"] == 0
            assert gauges["taskcast_read_bound_events_behind"] == 0
    finally:
        await stalled.close()


def _gauges(text: str) -> dict[str, float]:
    return {name: float(value) for name, _, value in
            (line.partition(" ") for line in text.splitlines() if line and not line.startswith("#"))
            if "{" not in name}
