"""Handlers of `refresh` and the commands (answered by `ack` once durable); the queries are
in queries.py, subscriptions in subscribe.py. `hello` is answered by the session itself
(server/protocol/session.py).

Every field arrives checked by the edge (server/protocol/frames.py). What is left here is
what needs the node: the principal's grants, the kinds and their input validators, the log.
A task the principal may not read answers exactly as one that does not exist.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from events import decide, deps
from events.errors import BadRequest, Forbidden, NotFound
from events.fold import View
from events.ids import TaskId, encode, new_task_id
from events.log import Ack, CreateTask
from events.model import Status
from server.fanout.hub import Subscription
from server.protocol.auth import not_found_message
from server.protocol.frames import AnswerFields, CreateFields, RefreshFields, Request, TaskFields

if TYPE_CHECKING:
    from server.protocol.session import Handler, Session


def ack_frame(request: Request, ack: Ack) -> dict[str, Any]:
    return {"type": "ack", "id": request.id, "task": ack.task, "status": ack.status,
            "position": encode(ack.position), "duplicate": ack.duplicate}


def result(request: Request, data: Any) -> dict[str, Any]:
    return {"type": "result", "id": request.id, "data": data}


async def visible_view(session: Session, task: str) -> View:
    """The view of a task the session's principal may read, as it is once the view is read
    (a `refresh` during the read is obeyed). Raises NotFound (also when it may not)."""
    view = await session.services.log.view(TaskId(task))
    session.require_principal().require_task(view)
    return view


# session


async def refresh(session: Session, request: Request) -> dict[str, Any]:
    """Replace the socket's token. Every subscription the new token no longer grants is
    dropped (`task:` and `scope:` channels by their scope; `all` filters by the principal
    on every update), and named in the result's `dropped`."""
    current = session.require_principal()
    principal = session.services.auth.verify(cast(RefreshFields, request.fields)["token"])
    if principal.name != current.name:
        raise Forbidden("a refreshed token must name the same principal")
    if not principal.scopes:
        raise Forbidden("the token grants no scope")
    session.principal = principal
    dropped = []
    for sub in list(session.subscriptions.values()):
        if sub.scope is not None and not principal.may(sub.scope):
            session.drop_subscription(sub)
            dropped.append(sub.channel)
    return result(request, {"expires_at": principal.expires_at, "dropped": dropped})


# commands


async def create(session: Session, request: Request) -> dict[str, Any] | None:
    started = time.perf_counter()
    f = cast(CreateFields, request.fields)
    principal = session.require_principal()
    services = session.services
    scope, kind = f["scope"], f["kind"]
    principal.require(scope)
    kind_spec = services.kinds.get(kind)
    if kind_spec is None:
        raise BadRequest(f"unknown kind {kind!r} in `kind`; known: {', '.join(sorted(services.kinds))}")
    if kind_spec.validate is not None:
        kind_spec.validate(f["input"])  # raises BadRequest naming the input field
    depends_on = list(dict.fromkeys(f.get("depends_on") or []))
    if depends_on:
        scopes = await services.log.scopes(depends_on)
        # A `refresh` may have narrowed the grant during that await: checked again with the
        # principal as it is now, with no await between this check and the write below.
        principal = session.require_principal()
        principal.require(scope)
        for dep in depends_on:
            if dep not in scopes or not principal.may(scopes[TaskId(dep)]):
                raise NotFound(not_found_message(dep))
    spec = CreateTask(kind=kind, scope=scope, input=f["input"], labels=f.get("labels") or [],
                      depends_on=depends_on, timeout_s=f.get("timeout_s"),
                      priority=f.get("priority") or 0,
                      mutex=kind_spec.mutex(f["input"]) if kind_spec.mutex else None)
    task = new_task_id()
    sub: Subscription | None = None
    if f.get("subscribe"):
        # Registered before the commit, so no event of the new task can slip past it; its
        # updates are held until the ack is written.
        sub = Subscription(session.conn, f"task:{task}", scope=scope)
        session.add_subscription(sub)
    try:
        ack = await services.log.create(spec, principal=principal.name, key=f.get("key"), task=task)
    except BaseException:
        if sub is not None:
            session.drop_subscription(sub)
        raise
    session.conn.send(ack_frame(request, ack))
    services.metrics.observe_ack(time.perf_counter() - started)
    if spec.depends_on and not ack.duplicate:
        await deps.settle(services.log, ack.task)  # its dependencies may have ended already
    if sub is not None:
        if ack.duplicate:
            session.drop_subscription(sub)
            from server.handlers.subscribe import follow

            await follow(session, f"task:{ack.task}", since=None, from_start=True)
        else:
            sub.go_live()
    return None


async def _command(session: Session, request: Request,
                   decision: Callable[[View], decide.Decision]) -> dict[str, Any]:
    started = time.perf_counter()
    principal = session.require_principal()
    f = cast(TaskFields, request.fields)

    def check(view: View) -> None:
        # Run by the log once it has read the view, just before its write: the principal as
        # it is then, so a `refresh` during the read is obeyed (as for a missing task).
        session.require_principal().require_task(view)

    ack = await session.services.log.command(TaskId(f["task"]), decision,
                                         principal=principal.name, key=f.get("key"),
                                         check=check)
    session.services.metrics.observe_ack(time.perf_counter() - started)
    if Status(ack.status).terminal and not ack.duplicate:
        session.services.spawn(deps.release(session.services.log, [ack.task]))
    return ack_frame(request, ack)


async def cancel(session: Session, request: Request) -> dict[str, Any]:
    reason = cast(TaskFields, request.fields).get("reason")
    return await _command(session, request, lambda view: decide.cancel(view, reason))


async def answer(session: Session, request: Request) -> dict[str, Any]:
    f = cast(AnswerFields, request.fields)
    return await _command(session, request, lambda view: decide.answer(view, f["question"], f["answer"]))


async def retry(session: Session, request: Request) -> dict[str, Any]:
    return await _command(session, request, decide.retry)


def handlers() -> dict[str, Handler]:
    """Every request handler, by frame type."""
    from server.handlers import queries, subscribe

    return {"refresh": refresh, "create": create, "cancel": cancel, "answer": answer, "retry": retry,
            "get": queries.get, "list": queries.list_, "history": queries.history,
            "subscribe": subscribe.subscribe, "unsubscribe": subscribe.unsubscribe}
