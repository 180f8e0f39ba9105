"""`subscribe` and `unsubscribe`: live updates, exact resume with `since`, snapshots.

The subscription is registered first, holding live updates, and only then is the log (or
the snapshot) read; afterwards the held updates are delivered, skipping what the read
already covered. Registration-before-read is what makes the hand-over gap-free.

The grant is checked against the session's principal as it is at each point that matters,
never as it was before an await: a `refresh` that narrows the token while a `subscribe`
awaits the database is either seen before the subscription is registered (it is refused,
as refresh would have dropped it) or finds it registered (and drops it, naming it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from events.errors import BadRequest, NotFound
from events.fold import compact
from events.ids import ZERO, Position, TaskId, encode, split
from events.tasks import MAX_LIST, TaskQuery
from server.fanout.hub import Subscription, frame
from server.protocol.auth import Principal, not_found_message
from server.protocol.frames import Request, SubscribeFields

if TYPE_CHECKING:
    from server.protocol.session import Session

CATCH_UP_PAGE = 500


def parse_channel(channel: str) -> tuple[str, str]:
    kind, sep, name = channel.partition(":")
    if channel == "all":
        return "all", ""
    if sep and name and kind in ("task", "scope"):
        return kind, name
    raise BadRequest(f"unknown channel {channel!r}: use task:<id>, scope:<scope> or all")


def granted(session: Session, kind: str, name: str, scope: str | None) -> Principal:
    """The session's principal as it is now, if it may follow the channel (`scope`: the
    scope of a `task:` channel's task). Raises as `subscribe` answers: NotFound for a task
    it may not read (exactly as for a missing one), Forbidden for a scope it does not hold."""
    principal = session.require_principal()
    if kind == "task" and (scope is None or not principal.may(scope)):
        raise NotFound(not_found_message(name))
    if kind == "scope":
        principal.require(name)
    return principal


async def subscribe(session: Session, request: Request) -> None:
    f = cast(SubscribeFields, request.fields)  # `since` arrives decoded (server/protocol/frames.py)
    await follow(session, f["channel"], since=f.get("since"), snapshot=bool(f.get("snapshot")),
                 request=request)


async def follow(session: Session, channel: str, *, since: Position | None,
                 snapshot: bool = False, from_start: bool = False,
                 request: Request | None = None) -> None:
    """Subscribe this socket to `channel`; see the module docstring."""
    principal = session.require_principal()
    kind, name = parse_channel(channel)
    services = session.services
    view = None
    scope: str | None = None
    if kind == "task":
        view = await services.log.view(TaskId(name))
        principal.require_task(view)  # a task it may not read is one that does not exist
        scope = view["scope"]
    elif kind == "scope":
        principal.require(name)
        scope = name
    if from_start:
        since = ZERO
    elif since is not None and not await _resumable(session, since):
        # PROTOCOL.md: a `since` that cannot be resumed exactly is answered recovered false,
        # with the current views instead.
        since, snapshot = None, True
    # A `refresh` may have narrowed the grant during the awaits above: checked again, with
    # no await between the check and the registration (which a later refresh will find).
    principal = granted(session, kind, name, scope)
    sub = Subscription(session.conn, channel, since or ZERO, scope=scope)
    session.add_subscription(sub)
    answer: dict[str, Any] = {"type": "subscribed", "channel": channel, "recovered": False,
                              "tasks": []}
    if request is not None:
        answer["id"] = request.id
    try:
        if since is not None:
            answer["recovered"] = True
            answer["position"] = encode(since)
            session.conn.send(answer)
            await _catch_up(session, sub, kind, name)
        elif snapshot:
            if view is not None:
                views, answer["position"] = [compact(view)], view["position"]
            else:
                page = await services.log.list_views(TaskQuery(
                    scope=name or None, limit=MAX_LIST,
                    scope_patterns=None if "*" in principal.scopes else principal.scopes))
                # A `refresh` during the read dropped a `scope:` subscription it no longer
                # grants (and named it): refused as such, never answered with its views.
                principal = granted(session, kind, name, scope)
                views = [compact(v) for v in page.tasks if principal.may(v["scope"])]
                answer["position"] = encode(page.position)
            # Live updates the snapshot already contains are skipped, per task, by version.
            sub.floor.update({TaskId(v["id"]): v["version"] for v in views})
            answer["tasks"] = views
            session.conn.send(answer)
        else:
            answer["position"] = encode(services.hub.head)
            session.conn.send(answer)
    except BaseException:
        session.drop_subscription(sub)
        raise
    if sub.active:
        sub.go_live()


async def _resumable(session: Session, since: Position) -> bool:
    """Whether the log can deliver exactly what came after `since`. Not when retention
    trimmed events after it, nor when this database never gave it out: its transaction id
    is at or beyond the next one to be assigned (a position cached from another deployment,
    or from a database since restored or recreated). Such a subscription would otherwise be
    accepted and stay silent until the log reached a position that may never come. Every
    position the server gave out is an event's, committed, so its transaction id is below."""
    log = session.services.log
    floor = await log.retention_floor()
    if floor != ZERO and since <= floor:
        return False
    return split(since)[0] < (await log.bound()).head


async def _catch_up(session: Session, sub: Subscription, kind: str, name: str) -> None:
    """Deliver every event of the channel after the subscription's cursor, from the log."""
    services = session.services
    while sub.active:
        events = await services.log.read_after(
            sub.cursor, task=TaskId(name) if kind == "task" else None,
            scope=name if kind == "scope" else None, limit=CATCH_UP_PAGE)
        if not events:
            return
        for update in await services.projector.updates(events):
            # The principal as it is now: a `refresh` during the catch-up narrows it at once.
            if kind != "all" or session.conn.may_read(update.scope):
                sub.deliver(update, frame(sub.channel, update))
            elif update.position > sub.cursor:
                sub.cursor = update.position
        if not session.conn.writable():
            await session.conn.drained()
        if len(events) < CATCH_UP_PAGE:
            return


async def unsubscribe(session: Session, request: Request) -> dict[str, Any]:
    channel = request.fields["channel"]
    sub = session.subscriptions.get(channel)
    if sub is None:
        raise NotFound(f"not subscribed to {channel!r}")
    session.drop_subscription(sub)
    return {"type": "result", "id": request.id, "data": {"channel": channel}}
