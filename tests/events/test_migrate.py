"""Migrations: applied once, in order, under a lock; an edited applied file stops the runner;
the previous release's calls keep working once migrated."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from cli.embedded import EmbeddedPostgres
from events.ids import TaskId
from events.log import CreateTask, EventLog
from events.migrate import MIGRATIONS_DIR, ChecksumMismatch, MigrationBlocked, discover, migrate
from events.model import EventType
from tests.waiting import eventually_async

Background = Callable[[Coroutine[Any, Any, list[str]]], asyncio.Task[list[str]]]


async def test_the_migrated_schema_has_the_expected_tables_and_functions(database_url: str) -> None:
    """Migrating an empty database yields the log, the projection, the queue, the keys and the
    writers' announcement (invariant 10)."""
    conn = await asyncpg.connect(database_url)
    try:
        tables = {r["tablename"] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        functions = {r["proname"] for r in await conn.fetch(
            "SELECT proname FROM pg_proc WHERE proname LIKE 'taskcast_%'")}
        columns = {r["column_name"]: r["data_type"] for r in await conn.fetch(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'events'")}
        triggers = {r["tgname"] for r in await conn.fetch(
            "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")}
    finally:
        await conn.close()
    assert tables == {"tasks", "events", "jobs", "command_keys", "relay_cursor", "retention",
                      "task_dependencies", "task_traces", "taskcast_migrations"}
    assert functions == {"taskcast_append_batch", "taskcast_create_batch", "taskcast_claim",
                         "taskcast_claim_start", "taskcast_remember_key", "taskcast_announce",
                         "taskcast_events_announced", "taskcast_writers", "taskcast_used_keys",
                         "taskcast_read_after", "taskcast_widen"}
    assert columns["xid"] == "xid8" and columns["data"] == "jsonb"
    assert triggers == {"events_announced"}


async def test_the_functions_keep_the_settings_their_plans_and_snapshots_need(database_url: str) -> None:
    """Every batch function reaches its tables by index at any size, without JIT (0008), and
    the one-trip read is VOLATILE, so each of its statements has a fresh snapshot (0009,
    invariant 4): a later CREATE OR REPLACE that forgot either would fail here."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT proname, provolatile, coalesce(proconfig, '{}') AS config "
                                "FROM pg_proc WHERE proname LIKE 'taskcast_%'")
    finally:
        await conn.close()
    batch = {"taskcast_append_batch", "taskcast_claim", "taskcast_claim_start", "taskcast_create_batch",
             "taskcast_remember_key", "taskcast_used_keys", "taskcast_read_after"}
    missing = [(r["proname"], r["config"]) for r in rows if r["proname"] in batch
               and not {"enable_seqscan=off", "jit=off"} <= set(r["config"])]
    assert missing == []
    assert {r["proname"]: r["provolatile"] for r in rows
            if r["proname"] in ("taskcast_read_after", "taskcast_writers")} == \
        {"taskcast_read_after": b"v", "taskcast_writers": b"v"}  # "char" comes as bytes


async def _has_lz4(conn: asyncpg.Connection) -> bool:
    """Whether this server was built with lz4 (it lists the method only then)."""
    return bool(await conn.fetchval(
        "SELECT 'lz4' = ANY (enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"))


async def test_long_views_are_stored_with_lz4_where_the_server_has_it(
        event_log: EventLog, database_url: str) -> None:
    """A view past the size PostgreSQL compresses at is compressed with lz4, the cheaper
    method for a row every append rewrites (0010), on a server built with it."""
    ack = await event_log.create(CreateTask("demo", "p", input={"notes": ["step output"] * 400}))
    conn = await asyncpg.connect(database_url)
    try:
        method = await conn.fetchval("SELECT pg_column_compression(view) FROM tasks WHERE id = $1", ack.task)
        expected = "lz4" if await _has_lz4(conn) else "pglz"
    finally:
        await conn.close()
    assert method == expected


async def test_a_server_without_lz4_still_migrates(own_postgres: EmbeddedPostgres) -> None:
    """The embedded server has no lz4: every migration applies there and its views keep pglz."""
    conn = await asyncpg.connect(own_postgres.url)
    try:
        assert not await _has_lz4(conn)
        applied = {r["name"] for r in await conn.fetch("SELECT name FROM taskcast_migrations")}
        methods = {r["attname"]: r["attcompression"] for r in await conn.fetch(
            "SELECT attname, attcompression FROM pg_attribute"
            " WHERE attrelid IN ('tasks'::regclass, 'events'::regclass)"
            "   AND attname IN ('view', 'data', 'snapshot')")}
    finally:
        await conn.close()
    assert applied == {m.name for m in discover()}
    assert methods == {"view": b"\0", "data": b"\0", "snapshot": b"\0"}  # the default method


async def test_migrating_twice_applies_nothing(database_url: str) -> None:
    """The runner records what it applied."""
    assert await migrate(database_url) == []


async def test_an_edited_applied_migration_stops_the_runner(database_url: str, tmp_path: Path) -> None:
    """A checksum mismatch refuses to start rather than guess at the schema."""
    for source in MIGRATIONS_DIR.glob("*.sql"):
        (tmp_path / source.name).write_text(source.read_text() + "\n-- edited\n")
    with pytest.raises(ChecksumMismatch):
        await migrate(database_url, tmp_path)


async def test_the_previous_releases_writes_still_work_once_migrated(
        event_log: EventLog, database_url: str) -> None:
    """A deploy migrates first and replaces the processes after: meanwhile a process of the
    previous release appends with the arguments of 0003's taskcast_append_batch, and creates
    and claims as before, and gets the answers it expects."""
    ack = await event_log.create(CreateTask("demo", "p"))
    view = await event_log.view(ack.task)
    conn = await asyncpg.connect(database_url)
    try:
        created = await conn.fetch(
            "SELECT item, task, status, xid, seq, duplicate FROM taskcast_create_batch("
            "ARRAY['tsk_old'], ARRAY['demo'], ARRAY['p'], ARRAY['queued'], ARRAY[$1::text::jsonb],"
            " ARRAY[0], ARRAY['{}'::jsonb], ARRAY[now()], ARRAY['queued'], ARRAY[NULL], ARRAY['p'],"
            " ARRAY['old key'])", orjson.dumps({**view, "id": "tsk_old"}).decode())
        assert [(r["item"], r["task"], r["status"], r["duplicate"]) for r in created] == [
            (1, "tsk_old", "queued", False)]
        rows = await conn.fetch(
            "SELECT item, outcome, xid, seq, version FROM taskcast_append_batch("
            "ARRAY[$1], ARRAY[$2::integer], ARRAY['cancelled'], ARRAY[$3::text::jsonb],"
            " ARRAY[NULL::bigint], ARRAY['cancel'], ARRAY[NULL::timestamptz], ARRAY[NULL], ARRAY[NULL],"
            " ARRAY[1], ARRAY[$2::integer + 1], ARRAY['task.cancelled'],"
            " ARRAY['{\"reason\": \"old\"}'::jsonb], ARRAY[now()])",
            ack.task, view["version"],
            orjson.dumps({**view, "status": "cancelled", "version": view["version"] + 1}).decode())
        assert [(r["item"], r["outcome"], r["version"]) for r in rows] == [(1, "ok", view["version"] + 1)]
    finally:
        await conn.close()
    assert (await event_log.view(ack.task))["status"] == "cancelled"
    assert [e.type for e in await event_log.history(TaskId("tsk_old"))] == [EventType.TASK_CREATED]


def _with_one_more(directory: Path, name: str, sql: str) -> Path:
    """`directory` holding the migrations, and one more, `name`, of `sql`."""
    for source in MIGRATIONS_DIR.glob("*.sql"):
        (directory / source.name).write_text(source.read_text())
    (directory / name).write_text(sql)
    return directory


@pytest.fixture
def locking_migration(tmp_path: Path) -> Path:
    """The migrations, and one more that takes `tasks` as an ALTER TABLE would."""
    return _with_one_more(tmp_path, "9999_lock_tasks.sql", "LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE;\n")


@pytest.fixture
async def background() -> AsyncIterator[Background]:
    """Starts a migration as a task; one still running when the test ends (a failed assert)
    is cancelled and awaited before the database is dropped."""
    started: list[asyncio.Task[list[str]]] = []

    def start(coro: Coroutine[Any, Any, list[str]]) -> asyncio.Task[list[str]]:
        started.append(asyncio.create_task(coro))
        return started[-1]

    yield start
    for task in started:
        task.cancel()
    await asyncio.gather(*started, return_exceptions=True)


async def test_a_migration_blocked_by_a_long_transaction_does_not_stop_the_others_queries(
        database_url: str, locking_migration: Path, background: Background) -> None:
    """While another transaction keeps a table a migration alters, the migration gives its
    place in the lock queue up again and again, so queries on that table go on; it applies
    once the transaction ends."""
    async with _an_application_reading_tasks(database_url) as (_, other):
        migrating = background(migrate(database_url, locking_migration, lock_timeout_s=0.2))
        await eventually_async(lambda: _waiting_for_a_lock(other), 10, poll_s=0.02)
        for _ in range(3):  # each waits out at most one attempt's lock wait, not the holder
            assert await asyncio.wait_for(other.fetchval("SELECT count(*) FROM tasks"), 5) >= 0
        assert not migrating.done()
    assert await asyncio.wait_for(migrating, 15) == ["9999_lock_tasks.sql"]


async def test_a_migration_blocked_past_its_patience_gives_up_and_says_why(
        database_url: str, locking_migration: Path) -> None:
    """A migration whose tables stay held is not applied, nor recorded, and the runner says
    which migration and why."""
    async with _an_application_reading_tasks(database_url) as (_, other):
        with pytest.raises(MigrationBlocked, match=r"9999_lock_tasks\.sql"):
            await asyncio.wait_for(
                migrate(database_url, locking_migration, lock_timeout_s=0.1, patience_s=1.0), 15)
        names = {r["name"] for r in await other.fetch("SELECT name FROM taskcast_migrations")}
    assert "9999_lock_tasks.sql" not in names


async def test_a_migration_that_deadlocks_with_an_application_is_tried_again(
        database_url: str, tmp_path: Path, background: Background, caplog: pytest.LogCaptureFixture) -> None:
    """A migration caught in a deadlock with an application's transaction (it holds one table
    the application reads next, and waits for another the application holds) is rolled back
    by PostgreSQL, tried again, and applied once the application's transaction ends."""
    migrations = _with_one_more(tmp_path, "9999_lock_two.sql", "LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE;\n"
                                "LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE;\n")
    async with _an_application_reading_tasks(database_url, deadlock_timeout_s=60) as (holder, other):
        migrating = background(migrate(database_url, migrations, lock_timeout_s=5))
        await eventually_async(lambda: _waiting_for_a_lock(other), 10, poll_s=0.02)  # holds jobs
        # The cycle: PostgreSQL rolls the migration's attempt back, and this read goes on.
        assert await asyncio.wait_for(holder.fetchval("SELECT count(*) FROM jobs"), 10) >= 0
        assert not migrating.done()
    assert await asyncio.wait_for(migrating, 15) == ["9999_lock_two.sql"]
    assert "deadlock detected" in caplog.text  # not a lock wait cut short (deadlock_timeout < 5 s)


@asynccontextmanager
async def _an_application_reading_tasks(
        database_url: str, *, deadlock_timeout_s: float | None = None,
) -> AsyncIterator[tuple[asyncpg.Connection, asyncpg.Connection]]:
    """An application's connection in a transaction that has read `tasks` (so holds its lock
    until the block ends: closing the connection rolls it back), and another connection.
    With `deadlock_timeout_s`, the application looks for deadlocks only that late: a cycle
    is then broken by rolling the other side back."""
    holder = await asyncpg.connect(database_url)
    other = await asyncpg.connect(database_url)
    try:
        if deadlock_timeout_s is not None:
            await holder.execute(f"SET deadlock_timeout = '{deadlock_timeout_s}s'")
        await holder.execute("BEGIN")
        await holder.fetchval("SELECT count(*) FROM tasks")
        yield holder, other
    finally:
        await holder.close()
        await other.close()


async def _waiting_for_a_lock(conn: asyncpg.Connection) -> bool:
    """Whether a session of this database waits for a lock now (the migration's attempt)."""
    return bool(await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock'"))
