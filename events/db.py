"""PostgreSQL connections: the pool, JSON codecs, and asyncpg errors turned into ours.

Nothing outside `events/` imports asyncpg: callers see only `events.errors`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import asyncpg
import orjson

from events import errors

Pool = asyncpg.Pool
Connection = asyncpg.Connection

_RAISED = {
    "TCV01": errors.VersionConflict,
    "TCN01": errors.NotFound,
    "TCF01": errors.StaleFence,
    "TCD01": errors.DuplicateKey,
}


async def _init(conn: asyncpg.Connection) -> None:
    # jsonb in binary form is a version byte (1) followed by the JSON text.
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog", format="binary",
        encoder=lambda v: b"\x01" + orjson.dumps(v),
        decoder=lambda b: orjson.loads(b[1:]),
    )


async def create_pool(url: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """A pool with taskcast's codecs. Raises Unavailable when PostgreSQL cannot be reached."""
    with translate():
        pool = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, init=_init,
                                         command_timeout=30)
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
    """Turn asyncpg and socket errors into taskcast errors."""
    try:
        yield
    except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
            asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError,
            asyncpg.AdminShutdownError, TimeoutError) as exc:
        raise errors.Unavailable(f"PostgreSQL is unavailable: {exc}") from exc
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
