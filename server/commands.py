"""Handlers of `hello`, the commands (answered by `ack` once durable) and the queries."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from events.errors import BadRequest
from events.ids import TaskId, encode, new_task_id
from events.log import Ack, CreateTask
from server.frames import Request
from server.hub import Subscription

if TYPE_CHECKING:
    from server.session import Handler, Session

MAX_SCOPE_CHARS = 200


def ack_frame(request: Request, ack: Ack) -> dict[str, Any]:
    return {"type": "ack", "id": request.id, "task": ack.task, "status": ack.status,
            "position": encode(ack.position), "duplicate": ack.duplicate}


async def hello(session: Session, request: Request) -> dict[str, Any]:
    principal = session.node.auth.verify(request.fields.get("token"))
    return session.welcome(request, principal)


async def create(session: Session, request: Request) -> dict[str, Any] | None:
    f = request.fields
    principal = session.require_principal()
    scope, kind = f["scope"], f["kind"]
    if not scope or len(scope) > MAX_SCOPE_CHARS:
        raise BadRequest(f"`scope` must be 1..{MAX_SCOPE_CHARS} chars")
    principal.require(scope)
    if kind not in session.node.kinds:
        raise BadRequest(f"unknown kind {kind!r}; known: {', '.join(sorted(session.node.kinds))}")
    spec = CreateTask(kind=kind, scope=scope, input=f["input"], labels=f.get("labels") or [],
                      depends_on=f.get("depends_on") or [], timeout_s=f.get("timeout_s"),
                      priority=f.get("priority") or 0)
    task = new_task_id()
    sub: Subscription | None = None
    if f.get("subscribe"):
        # Registered before the commit, so no event of the new task can slip past it; its
        # updates are held until the ack is written.
        sub = Subscription(session.conn, f"task:{task}")
        session.add_subscription(sub)
    try:
        ack = await session.node.log.create(spec, principal=principal.name, key=f.get("key"), task=task)
    except BaseException:
        if sub is not None:
            session.drop_subscription(sub)
        raise
    session.conn.send(ack_frame(request, ack))
    if sub is not None:
        if ack.duplicate:
            session.drop_subscription(sub)
            from server.subscribe import follow

            await follow(session, f"task:{ack.task}", since=None, from_start=True)
        else:
            sub.go_live()
    return None


async def get(session: Session, request: Request) -> dict[str, Any]:
    principal = session.require_principal()
    view = await session.node.log.view(TaskId(request.fields["task"]))
    principal.require(view["scope"])
    return {"type": "result", "id": request.id, "data": view}


def handlers() -> dict[str, Handler]:
    from server import subscribe

    return {"hello": hello, "create": create, "get": get,
            "subscribe": subscribe.subscribe, "unsubscribe": subscribe.unsubscribe}



