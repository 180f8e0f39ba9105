"""Handlers of `hello`, `refresh`, the commands (answered by `ack` once durable) and the
queries (answered by `result`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from events import decide, deps
from events.errors import BadRequest, Forbidden, Unauthorized
from events.fold import View
from events.ids import TaskId, encode, new_task_id
from events.log import Ack, CreateTask
from events.model import Status
from events.tasks import MAX_LIST, TaskQuery, list_tasks
from server.frames import Request
from server.hub import Subscription

if TYPE_CHECKING:
    from server.session import Handler, Session

MAX_SCOPE_CHARS = 200
MAX_HISTORY = 1000


def ack_frame(request: Request, ack: Ack) -> dict[str, Any]:
    return {"type": "ack", "id": request.id, "task": ack.task, "status": ack.status,
            "position": encode(ack.position), "duplicate": ack.duplicate}


def result(request: Request, data: Any) -> dict[str, Any]:
    return {"type": "result", "id": request.id, "data": data}


# session


async def hello(session: Session, request: Request) -> dict[str, Any] | None:
    try:
        principal = session.node.auth.verify(request.fields.get("token"))
    except Unauthorized as exc:
        session.conn.close(4401, str(exc)[:120])
        return None
    if not principal.scopes:
        session.conn.close(4403, "the token grants no scope")
        return None
    if not session.node.admit(principal.name):
        session.conn.close(4429, "too many connections for this principal")
        return None
    return session.welcome(request, principal)


async def refresh(session: Session, request: Request) -> dict[str, Any]:
    current = session.require_principal()
    principal = session.node.auth.verify(request.fields["token"])
    if principal.name != current.name:
        raise Forbidden("a refreshed token must name the same principal")
    session.principal = principal
    for sub in list(session.subscriptions.values()):
        kind, _, name = sub.channel.partition(":")
        if kind == "scope" and not principal.may(name):
            session.drop_subscription(sub)
    return result(request, {"expires_at": principal.expires_at})


# commands


async def create(session: Session, request: Request) -> dict[str, Any] | None:
    started = time.perf_counter()
    f = request.fields
    principal = session.require_principal()
    scope, kind = f["scope"], f["kind"]
    if not scope or len(scope) > MAX_SCOPE_CHARS:
        raise BadRequest(f"`scope` must be 1..{MAX_SCOPE_CHARS} chars")
    principal.require(scope)
    if kind not in session.node.kinds:
        raise BadRequest(f"unknown kind {kind!r}; known: {', '.join(sorted(session.node.kinds))}")
    timeout_s = f.get("timeout_s")
    if timeout_s is not None and timeout_s <= 0:
        raise BadRequest("`timeout_s` must be positive")
    kind_spec = session.node.kinds[kind]
    spec = CreateTask(kind=kind, scope=scope, input=f["input"], labels=f.get("labels") or [],
                      depends_on=f.get("depends_on") or [], timeout_s=timeout_s,
                      priority=f.get("priority") or 0,
                      mutex=kind_spec.mutex(f["input"]) if kind_spec.mutex else None)
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
    session.node.metrics.observe_ack(time.perf_counter() - started)
    if spec.depends_on and not ack.duplicate:
        await deps.settle(session.node.log, ack.task)  # its dependencies may have ended already
    if sub is not None:
        if ack.duplicate:
            session.drop_subscription(sub)
            from server.subscribe import follow

            await follow(session, f"task:{ack.task}", since=None, from_start=True)
        else:
            sub.go_live()
    return None


async def _command(session: Session, request: Request,
                   decision: Callable[[View], decide.Decision]) -> dict[str, Any]:
    started = time.perf_counter()
    principal = session.require_principal()

    def check(view: View) -> None:
        principal.require(view["scope"])

    ack = await session.node.log.command(TaskId(request.fields["task"]), decision,
                                         principal=principal.name, key=request.fields.get("key"),
                                         check=check)
    session.node.metrics.observe_ack(time.perf_counter() - started)
    if Status(ack.status).terminal and not ack.duplicate:
        session.node.spawn(deps.release(session.node.log, ack.task))
    return ack_frame(request, ack)


async def cancel(session: Session, request: Request) -> dict[str, Any]:
    reason = request.fields.get("reason")
    return await _command(session, request, lambda view: decide.cancel(view, reason))


async def answer(session: Session, request: Request) -> dict[str, Any]:
    f = request.fields
    return await _command(session, request, lambda view: decide.answer(view, f["question"], f["answer"]))


async def retry(session: Session, request: Request) -> dict[str, Any]:
    return await _command(session, request, decide.retry)


# queries


async def get(session: Session, request: Request) -> dict[str, Any]:
    principal = session.require_principal()
    view = await session.node.log.view(TaskId(request.fields["task"]))
    principal.require(view["scope"])
    return result(request, view)


async def list_(session: Session, request: Request) -> dict[str, Any]:
    principal = session.require_principal()
    f = request.fields
    if f.get("scope") is not None:
        principal.require(f["scope"])
    limit = 50 if f.get("limit") is None else f["limit"]
    if not 1 <= limit <= MAX_LIST:
        raise BadRequest(f"`limit` must be 1..{MAX_LIST}")
    page = await list_tasks(session.node.pool, TaskQuery(
        scope=f.get("scope"), statuses=tuple(f["status"]) if f.get("status") else None,
        kind=f.get("kind"), label=f.get("label"),
        scope_patterns=None if "*" in principal.scopes else principal.scopes,
        limit=limit, cursor=f.get("cursor")))
    views = [v for v in page.tasks if principal.may(v["scope"])]
    return result(request, {"tasks": views, "cursor": page.cursor, "position": encode(page.position)})


async def history(session: Session, request: Request) -> dict[str, Any]:
    principal = session.require_principal()
    f = request.fields
    task = TaskId(f["task"])
    limit = MAX_HISTORY if f.get("limit") is None else f["limit"]
    after = f.get("after") or 0
    if not 1 <= limit <= MAX_HISTORY:
        raise BadRequest(f"`limit` must be 1..{MAX_HISTORY}")
    if after < 0:
        raise BadRequest("`after` must be a version (>= 0)")
    view = await session.node.log.view(task)
    principal.require(view["scope"])
    events = await session.node.log.history(task, after, limit + 1)
    return result(request, {"events": [e.wire() for e in events[:limit]], "more": len(events) > limit})


def handlers() -> dict[str, Handler]:
    from server import subscribe

    return {"hello": hello, "refresh": refresh, "create": create, "cancel": cancel,
            "answer": answer, "retry": retry, "get": get, "list": list_, "history": history,
            "subscribe": subscribe.subscribe, "unsubscribe": subscribe.unsubscribe}
