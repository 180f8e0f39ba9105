"""The migration runner: applies `migrations/NNNN_*.sql` in order, under an advisory lock.

Each applied file is recorded with its checksum; a file that changed after it was applied
stops the runner (ChecksumMismatch) rather than leaving the schema in an unknown state.

A migration that alters a table waits for its lock behind every transaction using the table,
and every query on the table then waits behind the migration: on a PostgreSQL shared with an
application, one long transaction of the application's would stop taskcast for as long as it
stays open. So each attempt at a migration waits at most LOCK_TIMEOUT_S for a lock, and is
rolled back and tried again later, for up to PATIENCE_S in all (MigrationBlocked); so is
an attempt PostgreSQL rolled back to break a deadlock with another transaction.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from events import db

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
_LOCK_KEY = 0x7461736B63617374  # "taskcast"
LOCK_TIMEOUT_S = 2.0  # one attempt's wait for a table lock, while queries queue behind it
PATIENCE_S = 300.0  # how long a migration is tried again before the runner gives up
RETRY_S = (0.5, 5.0)  # the pause between attempts: the first, doubling up to the second

log = logging.getLogger("taskcast.migrate")


class ChecksumMismatch(RuntimeError):
    """An applied migration file was changed afterwards."""


class MigrationBlocked(RuntimeError):
    """A migration could not take its tables' locks: other transactions held them throughout."""


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migration files, in order of name."""
    return [Migration(p.name, p.read_text()) for p in sorted(directory.glob("[0-9][0-9][0-9][0-9]_*.sql"))]


async def migrate(url: str, directory: Path = MIGRATIONS_DIR, *, lock_timeout_s: float = LOCK_TIMEOUT_S,
                  patience_s: float = PATIENCE_S) -> list[str]:
    """Apply pending migrations; return the names applied.

    Raises ChecksumMismatch when an applied file changed, MigrationBlocked when a migration
    found its locks held for `patience_s` (those before it stay applied), Unavailable when
    PostgreSQL is down.
    """
    conn = await db.connect(url)
    try:
        with db.translate():
            await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
            try:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS taskcast_migrations ("
                    " name text PRIMARY KEY, checksum text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())")
                applied = {r["name"]: r["checksum"] for r in
                           await conn.fetch("SELECT name, checksum FROM taskcast_migrations")}
                done: list[str] = []
                for migration in discover(directory):
                    if migration.name in applied:
                        if applied[migration.name] != migration.checksum:
                            raise ChecksumMismatch(
                                f"{migration.name} changed after it was applied; "
                                "write a new migration instead")
                        continue
                    await _apply(conn, migration, lock_timeout_s, patience_s)
                    done.append(migration.name)
                return done
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    finally:
        await conn.close()


async def _apply(conn: asyncpg.Connection, migration: Migration, lock_timeout_s: float,
                 patience_s: float) -> None:
    """Apply one migration in a transaction of its own, its lock waits cut at `lock_timeout_s`
    and the whole tried again until `patience_s` has passed."""
    deadline = time.monotonic() + patience_s
    pause_s, attempts = RETRY_S[0], 0
    while True:
        attempts += 1
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = {max(1, round(lock_timeout_s * 1000))}")
                await conn.execute(migration.sql)
                await conn.execute("INSERT INTO taskcast_migrations (name, checksum) VALUES ($1, $2)",
                                   migration.name, migration.checksum)
            return
        # A wait cut short, or a deadlock with an application's transaction (PostgreSQL finds
        # those after deadlock_timeout, 1 s, before the lock_timeout): either rolled the
        # whole attempt back, so it is tried again.
        except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError) as exc:
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                raise MigrationBlocked(
                    f"{migration.name} could not take its locks in {attempts} attempts over "
                    f"{patience_s:.0f} s ({exc}); a long transaction holds a table it alters: "
                    "end it, or migrate when it is over") from exc
            log.warning("%s is waiting for a lock other transactions hold (%s); trying again in %.1f s",
                        migration.name, exc, min(pause_s, left_s))
            await asyncio.sleep(min(pause_s, left_s))
            pause_s = min(pause_s * 2, RETRY_S[1])
