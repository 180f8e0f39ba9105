"""Handlers of the queries (answered by `result`): `get`, `list`, `history`. A task the
principal may not read answers exactly as one that does not exist."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import orjson

from events.fold import compact
from events.ids import TaskId, encode
from events.tasks import TaskQuery
from server.handlers.commands import result, visible_view
from server.protocol.frames import MAX_HISTORY_LIMIT, HistoryFields, ListFields, Request, TaskFields

if TYPE_CHECKING:
    from server.protocol.session import Session


async def get(session: Session, request: Request) -> dict[str, Any]:
    """The whole view (with `input`, `answers` and step results), unlike updates'; for a
    task whose stored view cannot be encoded whole, its compact form, marked `degraded`."""
    view = await visible_view(session, cast(TaskFields, request.fields)["task"])
    if not _encodable(view):
        view = {**compact(view), "degraded": True}
    return result(request, view)


async def list_(session: Session, request: Request) -> dict[str, Any]:
    principal = session.require_principal()
    f = cast(ListFields, request.fields)
    if f.get("scope") is not None:
        principal.require(f["scope"])
    page = await session.services.log.list_views(TaskQuery(
        scope=f.get("scope"), statuses=tuple(f["status"]) if f.get("status") else None,
        kind=f.get("kind"), label=f.get("label"),
        scope_patterns=None if "*" in principal.scopes else principal.scopes,
        limit=f.get("limit") or 50, cursor=f.get("cursor")))
    # The principal as it is now: a `refresh` during the read is obeyed.
    principal = session.require_principal()
    if f.get("scope") is not None:
        principal.require(f["scope"])
    views = [compact(v) for v in page.tasks if principal.may(v["scope"])]
    return result(request, {"tasks": views, "cursor": page.cursor, "position": encode(page.position)})


async def history(session: Session, request: Request) -> dict[str, Any]:
    f = cast(HistoryFields, request.fields)
    limit = f.get("limit") or MAX_HISTORY_LIMIT
    view = await visible_view(session, f["task"])
    events = await session.services.log.history(TaskId(f["task"]), f.get("after") or 0, limit + 1)
    session.require_principal().require_task(view)  # as it is now, after the read
    wire = [e.wire() for e in events[:limit]]
    if not _encodable(wire):  # an event stored before the edge checked it: degraded alone
        wire = [w if _encodable(w) else {**w, "data": {}, "degraded": True} for w in wire]
    return result(request, {"events": wire, "more": len(events) > limit})


def _encodable(value: Any) -> bool:
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return False
    return True



