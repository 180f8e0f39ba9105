"""The migration runner: applies `migrations/NNNN_*.sql` in order, under an advisory lock.

Each applied file is recorded with its checksum; a file that changed after it was applied
stops the runner (ChecksumMismatch) rather than leaving the schema in an unknown state.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from events import db

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
_LOCK_KEY = 0x7461736B63617374  # "taskcast"


class ChecksumMismatch(RuntimeError):
    """An applied migration file was changed afterwards."""


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


async def migrate(url: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply pending migrations; return the names applied.

    Raises ChecksumMismatch when an applied file changed, Unavailable when PostgreSQL is down.
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
                    async with conn.transaction():
                        await conn.execute(migration.sql)
                        await conn.execute(
                            "INSERT INTO taskcast_migrations (name, checksum) VALUES ($1, $2)",
                            migration.name, migration.checksum)
                    done.append(migration.name)
                return done
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    finally:
        await conn.close()
