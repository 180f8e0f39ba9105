"""Reading task views: filtered, paginated lists and consistent snapshots."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import orjson

from events import db
from events.bound import bound_on
from events.errors import BadRequest
from events.fold import View
from events.ids import ZERO, Position, encode, position
from events.sql import q

MAX_LIST = 500


@dataclass(frozen=True, slots=True)
class TaskQuery:
    scope: str | None = None
    statuses: tuple[str, ...] | None = None
    kind: str | None = None
    label: str | None = None
    scope_patterns: tuple[str, ...] | None = None  # the reader's grants; None: every scope
    limit: int = 50
    cursor: str | None = None


@dataclass(frozen=True, slots=True)
class Page:
    tasks: list[View]
    cursor: str | None  # where the next page starts; None when this is the last
    position: Position  # subscribe `since` this to follow the listed tasks from here


def like(pattern: str) -> str:
    """A scope pattern (`repo:acme/*`) as a LIKE pattern."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _encode_cursor(created_at: datetime, task: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([created_at.isoformat(), task])).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        at, task = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
        when = datetime.fromisoformat(at)
    except (ValueError, TypeError) as exc:
        raise BadRequest("`cursor` is not one this server gave out") from exc
    if not isinstance(task, str) or "\x00" in task or len(task) > 64 or when.tzinfo is None:
        raise BadRequest("`cursor` is not one this server gave out")
    return when, task


async def list_tasks(pool: asyncpg.Pool, query: TaskQuery) -> Page:
    """One page of views, newest first, with the log position they are consistent with.

    Views and position come from one REPEATABLE READ snapshot: following the list with
    `since=position` misses nothing (it may repeat versions the views already contain).
    Raises BadRequest for a bad limit or cursor, Unavailable.
    """
    if not 1 <= query.limit <= MAX_LIST:
        raise BadRequest(f"`limit` must be 1..{MAX_LIST}")
    after_at, after_id = _decode_cursor(query.cursor) if query.cursor else (None, None)
    patterns = None if query.scope_patterns is None else [like(p) for p in query.scope_patterns]
    async with db.acquire(pool) as conn:
        # The read bound first, in a statement of its own: the snapshot below is taken after
        # it, so every event below the bound is in that snapshot (invariants 4 and 10).
        bound = await bound_on(conn)
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            head_row = await conn.fetchrow(q("head"), bound.xid)
            rows = await conn.fetch(
                q("list_tasks"), query.scope, list(query.statuses) if query.statuses else None,
                query.kind, query.label, patterns, after_at, after_id, query.limit + 1)
    head = ZERO if head_row is None else position(head_row["xid"], head_row["seq"])
    views: list[View] = []
    for row in rows[:query.limit]:
        view = row["view"]
        if row["xid"] is not None:
            view["position"] = encode(position(row["xid"], row["seq"]))
        views.append(view)
    more = len(rows) > query.limit
    last = rows[query.limit - 1] if more else None
    return Page(views, _encode_cursor(last["created_at"], last["id"]) if last else None, head)
