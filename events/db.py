"""PostgreSQL connections: the pool, JSON codecs, and asyncpg errors turned into ours.

Nothing outside `events/` imports asyncpg: callers see only `events.errors`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import asyncpg
import orjson

from events import errors

log = logging.getLogger("taskcast.db")

Pool = asyncpg.Pool
Connection = asyncpg.Connection

_RAISED = {
    "TCV01": errors.VersionConflict,
    "TCN01": errors.NotFound,
    "TCF01": errors.StaleFence,
    "TCD01": errors.DuplicateKey,
}


def _decode_jsonb(data: bytes) -> Any:
    """jsonb in binary form is a version byte (1) followed by the JSON text. What taskcast
    stored always decodes with orjson; a value written by other means (numbers beyond a
    double, nesting beyond 1024) falls back to the standard library, and past that to a
    marker, so one such row cannot make a whole read fail (invariant 9)."""
    try:
        return orjson.loads(data[1:])
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(data[1:])
    except (ValueError, RecursionError):
        log.error("a stored JSON value cannot be decoded (%d bytes)", len(data))
        return {"undecodable": True}


class _Connection(asyncpg.Connection):  # type: ignore[misc]
    """A pooled connection that goes back to the pool without a reset query.

    asyncpg's default reset (unlock advisory locks, CLOSE ALL, UNLISTEN, RESET ALL) is a
    round trip on every release: as much as the statement itself for most of ours. Nothing
    taskcast runs on a pooled connection leaves session state behind: LISTEN is done on
    connections of their own (`connect`), settings are transaction-local, and the one
    session advisory lock (events/kinds/repolock.py) is released by its holder, which
    terminates the connection when it cannot. An open transaction is still rolled back.
    """

    def get_reset_query(self) -> str:
        return ""


async def _init(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog", format="binary",
        encoder=lambda v: b"\x01" + orjson.dumps(v),
        decoder=_decode_jsonb,
    )


async def create_pool(url: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """A pool with taskcast's codecs. Raises Unavailable when PostgreSQL cannot be reached."""
    with translate():
        pool = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, init=_init,
                                         command_timeout=30, connection_class=_Connection)
    assert pool is not None
    return pool


async def connect(url: str) -> asyncpg.Connection:
    """One connection with taskcast's codecs (for LISTEN, or the relay's leadership lock)."""
    with translate():
        conn = await asyncpg.connect(url)
        await _init(conn)
    return conn


@contextmanager
def translate() -> Iterator[None]:
    """Turn asyncpg and socket errors into taskcast errors. Every error of an outage (a
    server restarting, a connection cut mid-query, a cancelled statement) is Unavailable.
    A cut after the commit was sent may still have committed: commands carry idempotency
    keys for that, and a worker checks before it writes again (TaskContext.write)."""
    try:
        yield
    except (OSError, EOFError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
            asyncpg.InternalClientError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError,
            asyncpg.AdminShutdownError, asyncpg.CrashShutdownError, asyncpg.QueryCanceledError,
            TimeoutError) as exc:
        raise errors.Unavailable(f"PostgreSQL is unavailable: {exc}") from exc
    except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError) as exc:
        # Rolled back whole, nothing written: the caller tries again as after an outage.
        raise errors.Unavailable(f"PostgreSQL rolled the transaction back: {exc}") from exc
    except asyncpg.PostgresError as exc:
        # Our SQL functions raise with their own SQLSTATEs (TC...); asyncpg reports those
        # as UnknownPostgresError.
        kind = _RAISED.get(getattr(exc, "sqlstate", None) or "")
        if kind is None:
            raise
        raise kind(exc.args[0] if exc.args else str(exc)) from exc


@asynccontextmanager
async def acquire(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A connection from the pool, with errors translated."""
    with translate():
        async with pool.acquire() as conn:
            yield conn
