"""A websocket session: the hello gate, dispatch of requests, its subscriptions.

States: AWAITING_HELLO -> OPEN -> CLOSED (and AWAITING_HELLO -> CLOSED). `hello` is
answered synchronously, as it is read (verifying a token needs no I/O), so a second
`hello` in the same TCP write already finds the session OPEN and is `bad_request`; before
`hello` is answered only `ping` is served (anything else: `unauthorized`). Requests that
need I/O run as tasks owned by the node; their answers carry the request's `id`.

Admission (the principal's connection count) is taken once, by the accepted `hello`, and
released exactly once, when the session closes, whichever way it ends.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from events.errors import BadRequest, Internal, RateLimited, TaskcastError, Unauthorized
from server.auth import Principal
from server.protocol.frames import FrameError, Request

if TYPE_CHECKING:
    from server.connection import Connection
    from server.hub import Subscription
    from server.node import Node

log = logging.getLogger("taskcast.session")

Handler = Callable[["Session", Request], Awaitable[dict[str, Any] | None]]


class SessionState(StrEnum):
    AWAITING_HELLO = "awaiting_hello"
    OPEN = "open"
    CLOSED = "closed"


_ALLOWED = {
    SessionState.AWAITING_HELLO: {SessionState.OPEN, SessionState.CLOSED},
    SessionState.OPEN: {SessionState.CLOSED},
    SessionState.CLOSED: set(),
}


class Session:
    def __init__(self, node: Node, conn: Connection) -> None:
        self.node = node
        self.conn = conn
        self.state = SessionState.AWAITING_HELLO
        self.id = "ses_" + secrets.token_hex(8)
        self.principal: Principal | None = None
        self.admitted: str | None = None  # the principal counted against its limit
        self.subscriptions: dict[str, Subscription] = {}
        self.window_start = time.monotonic()
        self.window_frames = 0
        self.strikes = 0

    def _to(self, state: SessionState) -> None:
        if state not in _ALLOWED[self.state]:
            raise RuntimeError(f"session cannot go from {self.state} to {state}")
        self.state = state

    # requests

    def refuse(self, exc: FrameError) -> None:
        self.node.metrics.frames_in += 1
        self.node.metrics.bad_frames += 1
        self.fail(exc.id, BadRequest(str(exc)))

    def handle(self, request: Request) -> None:
        self.node.metrics.frames_in += 1
        if self.state is SessionState.CLOSED or not self._within_rate(request):
            return
        if request.type == "pong":
            return
        if request.type == "ping":
            self.conn.send({"type": "pong", "id": request.id})
            return
        if request.type == "hello":
            if self.state is not SessionState.AWAITING_HELLO:
                self.fail(request.id, BadRequest("`hello` was answered already"))
            else:
                self._hello(request)
            return
        if self.state is not SessionState.OPEN:
            self.fail(request.id, Unauthorized("send `hello` first"))
            return
        handler = self.node.handlers[request.type]
        self.conn.request_started()
        self.node.spawn(self._run(handler, request))

    async def _run(self, handler: Handler, request: Request) -> None:
        try:
            answer = await handler(self, request)
            if answer is not None:
                self.conn.send(answer)
        except TaskcastError as exc:
            self.fail(request.id, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed", request.type)
            self.node.metrics.internal_errors += 1
            self.fail(request.id, Internal("internal error"))
        finally:
            self.conn.request_done()

    def fail(self, id_: Any, exc: TaskcastError) -> None:
        """Answer with an `error` frame: its code and retryability are the error's own
        (events/errors.py is the one error tree of every error frame)."""
        frame: dict[str, Any] = {"type": "error", "code": exc.code, "message": str(exc),
                                 "retryable": exc.retryable}
        if id_ is not None:
            frame["id"] = id_
        self.conn.send(frame)

    def _within_rate(self, request: Request) -> bool:
        """Frames per second per socket: over the limit, each frame is refused with
        `rate_limited` (so a client waiting on an id is answered); over it again in the
        next seconds, close 4429."""
        now = time.monotonic()
        if now - self.window_start >= 1.0:
            self.strikes = self.strikes + 1 if self.window_frames > self.node.settings.rate_per_s else 0
            self.window_start, self.window_frames = now, 0
        self.window_frames += 1
        if self.window_frames <= self.node.settings.rate_per_s:
            return True
        if self.strikes >= 2:
            self.conn.close(4429, "too many frames")
        elif request.id is not None or self.window_frames == self.node.settings.rate_per_s + 1:
            self.fail(request.id, RateLimited(
                f"more than {self.node.settings.rate_per_s} frames per second; slow down"))
        return False

    # hello

    def _hello(self, request: Request) -> None:
        """Verify the token, admit the principal, answer `welcome` (or close)."""
        try:
            principal = self.node.auth.verify(request.fields.get("token"))
        except Unauthorized as exc:
            self.conn.close(4401, str(exc)[:120])
            return
        if not principal.scopes:
            self.conn.close(4403, "the token grants no scope")
            return
        if not self.node.admit(principal.name):
            self.conn.close(4429, "too many connections for this principal")
            return
        self.admitted = principal.name
        self.principal = principal
        self._to(SessionState.OPEN)
        s = self.node.settings
        self.conn.send({"type": "welcome", "id": request.id, "session": self.id, "node": s.node_id,
                        "heartbeat_s": s.heartbeat_s,
                        "limits": {"max_frame_bytes": s.max_frame_bytes,
                                   "max_subscriptions": s.max_subscriptions, "rate_per_s": s.rate_per_s,
                                   "max_input_bytes": s.max_input_bytes,
                                   "max_json_depth": s.max_json_depth}})

    def require_principal(self) -> Principal:
        if self.principal is None:
            raise Unauthorized("send `hello` first")
        return self.principal

    # subscriptions

    def add_subscription(self, sub: Subscription) -> None:
        old = self.subscriptions.get(sub.channel)
        if old is not None:
            self.node.hub.remove(old)
        elif len(self.subscriptions) >= self.node.settings.max_subscriptions:
            raise BadRequest(f"at most {self.node.settings.max_subscriptions} subscriptions per socket")
        self.subscriptions[sub.channel] = sub
        self.node.hub.add(sub)

    def drop_subscription(self, sub: Subscription) -> None:
        self.node.hub.remove(sub)
        if self.subscriptions.get(sub.channel) is sub:
            del self.subscriptions[sub.channel]

    def closed(self) -> None:
        """The socket ended: release admission once, drop every subscription. Idempotent."""
        if self.admitted is not None:
            self.node.release(self.admitted)
            self.admitted = None
        if self.state is not SessionState.CLOSED:
            self._to(SessionState.CLOSED)
        for sub in list(self.subscriptions.values()):
            self.node.hub.remove(sub)
        self.subscriptions.clear()
