"""Migrations: applied once, in order, under a lock; an edited applied file stops the runner."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from events.migrate import MIGRATIONS_DIR, ChecksumMismatch, migrate


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
                         "taskcast_events_announced", "taskcast_writers", "taskcast_used_keys"}
    assert columns["xid"] == "xid8" and columns["data"] == "jsonb"
    assert triggers == {"events_announced"}


async def test_migrating_twice_applies_nothing(database_url: str) -> None:
    """The runner records what it applied."""
    assert await migrate(database_url) == []


async def test_an_edited_applied_migration_stops_the_runner(database_url: str, tmp_path: Path) -> None:
    """A checksum mismatch refuses to start rather than guess at the schema."""
    for source in MIGRATIONS_DIR.glob("*.sql"):
        (tmp_path / source.name).write_text(source.read_text() + "\n-- edited\n")
    with pytest.raises(ChecksumMismatch):
        await migrate(database_url, tmp_path)
