"""The log's read bound: the transaction id below which no taskcast write can still commit.

Invariant 10: only taskcast's own writes bound the read. Every transaction that inserts
events announces itself (a shared advisory lock taken before it has a transaction id,
migrations/0002_writer_bound.sql), and `taskcast_writers()` reads, in this order, `x0`
(the xmax of a fresh snapshot) and then the announced writers in flight. The bound is the
smallest of `x0` and their transaction ids; the caller reads events below it in a snapshot
taken afterwards (invariant 4; the proof is in the migration's header).

Why not logical decoding (the other way issue 11 names): it needs wal_level=logical, which
external servers often lack (the machine's PostgreSQL 15 has `replica`; changing it takes a
restart), and asyncpg has no replication protocol, so it would be polled through
pg_logical_slot_get_changes, which re-decodes the WAL from the slot's restart point, held
back by any open transaction: measured (bench/read_bound.py, PG 18, 400 events/s, medians
of 3), a call cost 1.55 ms quiet and 4.9 ms with a foreign transaction open (announce:
0.55 ms either way), and delivery p99 went 6.8 -> 14.8 ms (announce: 4.7 -> 2.7 ms).

Pure but for `bound_on`, the one query: turning the writers' 32-bit ids into xid8 and
picking the bound, tested directly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from events.sql import q

if TYPE_CHECKING:
    from asyncpg import Connection

XID_EPOCH = 1 << 32


def widen(xid: int, near: int) -> int:
    """The xid8 of the 32-bit transaction id `xid`, given `near`, an xid8 less than 2**31
    away from it.

    PostgreSQL reports a backend's transaction id (pg_stat_activity.backend_xid) as 32 bits;
    the log's positions are xid8 (epoch << 32 | xid). A running transaction's id is always
    within 2**31 of the next id to be assigned (wraparound protection stops the server
    before that), and `x0` is at most a few ids from that, so the nearest match is the one.
    """
    if not 0 <= xid < XID_EPOCH:
        raise ValueError(f"{xid} is not a 32-bit transaction id")
    delta = (xid - near) % XID_EPOCH
    if delta >= XID_EPOCH // 2:
        delta -= XID_EPOCH
    return near + delta


@dataclass(frozen=True, slots=True)
class Writer:
    """A taskcast write transaction in flight."""

    pid: int
    xid: int | None  # xid8; None while the transaction has no id yet (it cannot hold the bound)
    age_s: float


@dataclass(frozen=True, slots=True)
class Bound:
    """What one read of `taskcast_writers()` says: read events whose xid is below `xid`."""

    xid: int
    head: int  # x0: every transaction id below it had been assigned when the writers were read
    cluster_xmin: int  # the v1 bound (oldest transaction of the whole server), for /metrics
    writers: tuple[Writer, ...] = ()

    @property
    def holder(self) -> Writer | None:
        """The in-flight writer the bound waits for (None: it is at the head)."""
        held = [w for w in self.writers if w.xid is not None and w.xid == self.xid]
        return held[0] if held else None

    @property
    def lag_xids(self) -> int:
        """How many transaction ids the bound is behind the head."""
        return self.head - self.xid


def compute(x0: int, cluster_xmin: int,
            writers: Iterable[tuple[int | None, int | None, float | None]]) -> Bound:
    """The bound from `taskcast_writers()`'s rows: (pid, 32-bit xid or None, age in seconds);
    a row with pid None means no writer was in flight."""
    found = tuple(Writer(pid, None if xid is None else widen(xid, x0), age_s or 0.0)
                  for pid, xid, age_s in writers if pid is not None)
    return Bound(min([x0, *(w.xid for w in found if w.xid is not None)]), x0, cluster_xmin, found)


async def bound_on(conn: Connection) -> Bound:
    """Read `taskcast_writers()` (x0 first, then the writers in flight) into a Bound.

    Read events below it in a snapshot taken afterwards: a later statement (READ COMMITTED),
    or a REPEATABLE READ transaction begun afterwards. Inside a REPEATABLE READ transaction,
    whose snapshot would be older, it raises (asyncpg's error, SQLSTATE TCW02)."""
    rows = await conn.fetch(q("writers"))
    return compute(rows[0]["x0"], rows[0]["cluster_xmin"],
                   ((r["pid"], r["xid"], r["age_s"]) for r in rows))
