"""Foreign write transactions: what the application beside taskcast does on the same server.

Each stays open only while its `async with` block runs, and at most `open_s` seconds in any
case (PostgreSQL ends it: idle_in_transaction_session_timeout), so a test that fails cannot
hold back another suite running on the same server for long.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg

OPEN_S = 20.0


@asynccontextmanager
async def foreign_write(url: str, *, open_s: float = OPEN_S) -> AsyncIterator[int]:
    """`BEGIN; INSERT INTO app_orders ...` on `url`, left open for the block; COMMIT after it.
    Yields the transaction's xid8."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS app_orders (id bigserial PRIMARY KEY, note text)")
        await conn.execute(f"SET idle_in_transaction_session_timeout = '{int(open_s * 1000)}ms'")
        await conn.execute("BEGIN")
        await conn.execute("INSERT INTO app_orders (note) VALUES ('a long batch job')")
        xid = int(await conn.fetchval("SELECT pg_current_xact_id()::text"))
        yield xid
        await conn.execute("COMMIT")
    finally:
        await conn.close(timeout=5)


@asynccontextmanager
async def other_database(url: str) -> AsyncIterator[str]:
    """A scratch database beside the one `url` names (the application's); dropped after."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/") + "_app"
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield urlunsplit(parts._replace(path="/" + name))
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close(timeout=5)


@asynccontextmanager
async def foreign_writes(url: str, *, open_s: float = OPEN_S) -> AsyncIterator[tuple[int, int]]:
    """Two foreign write transactions, open for the block: one in the database `url` names,
    one in another database of the same server. Yields their xid8s."""
    async with other_database(url) as other, foreign_write(url, open_s=open_s) as here, \
            foreign_write(other, open_s=open_s) as there:
        yield here, there
