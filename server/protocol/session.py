"""A websocket session: the hello gate, the rate limit, dispatch, its subscriptions.

Pure: `receive(request, now)` and `refuse(error)` return the actions the socket must take
(`Send` a frame, `Close` with a code, `Run` a handler); the session never writes or
awaits itself, so each rule is tested directly (tests/server/protocol/test_session.py).
Its collaborators are in-memory: auth (token checks), admission (connections per
principal), the hub (subscriptions) and the metrics counters.

States: AWAITING_HELLO -> OPEN -> CLOSED (and AWAITING_HELLO -> CLOSED). `hello` is
answered as it is read, so a second `hello` in the same TCP write already finds the
session OPEN and is `bad_request`; before `hello` is answered only `ping` is served
(anything else: `unauthorized`). Admission is taken once, by the accepted `hello`, and
released exactly once, when the session closes, whichever way it ends.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from events.errors import BadRequest, RateLimited, TaskcastError, Unauthorized
from events.ids import Position
from server.protocol.auth import Principal
from server.protocol.frames import FrameError, Request

if TYPE_CHECKING:
    from server.fanout.hub import Subscription
    from server.services import Services

Handler = Callable[["Session", Request], Awaitable[dict[str, Any] | None]]


class Peer(Protocol):
    """The socket, as handlers see it (server/transport/connection.py is the one)."""

    def send(self, frame: dict[str, Any]) -> None: ...
    def writable(self) -> bool: ...
    async def drained(self) -> None: ...
    # and, as the hub's Sink:
    def write_update(self, sub: Subscription, before: Position, frame: bytes) -> None: ...
    def flush(self) -> None: ...
    def resync(self, sub: Subscription) -> None: ...
    def may_read(self, scope: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class Send:
    frame: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Run:
    """Run the request's handler as a task; its answer (or error) is sent with its id."""

    request: Request


Action = Send | Close | Run


class SessionState(StrEnum):
    AWAITING_HELLO = "awaiting_hello"
    OPEN = "open"
    CLOSED = "closed"


_ALLOWED = {
    SessionState.AWAITING_HELLO: {SessionState.OPEN, SessionState.CLOSED},
    SessionState.OPEN: {SessionState.CLOSED},
    SessionState.CLOSED: set(),
}


def error_frame(id_: Any, exc: TaskcastError) -> dict[str, Any]:
    """An `error` frame: its code and retryability are the error's own (events/errors.py is
    the one error tree of every error frame)."""
    frame: dict[str, Any] = {"type": "error", "code": exc.code, "message": str(exc),
                             "retryable": exc.retryable}
    if id_ is not None:
        frame["id"] = id_
    return frame


class Session:
    def __init__(self, services: Services, conn: Peer, *, now: float = 0.0) -> None:
        self.services = services
        self.conn = conn  # what handlers write to, and the sink of this session's subscriptions
        self.state = SessionState.AWAITING_HELLO
        self.id = "ses_" + secrets.token_hex(8)
        self.principal: Principal | None = None
        self.admitted: str | None = None  # the principal counted against its limit
        self.subscriptions: dict[str, Subscription] = {}
        self.window_start = now
        self.window_frames = 0
        self.strikes = 0

    def _to(self, state: SessionState) -> None:
        if state not in _ALLOWED[self.state]:
            raise RuntimeError(f"session cannot go from {self.state} to {state}")
        self.state = state

    # frames in

    def refuse(self, exc: FrameError) -> list[Action]:
        """A frame the edge refused."""
        self.services.metrics.frames_in += 1
        self.services.metrics.bad_frames += 1
        return [Send(error_frame(exc.id, BadRequest(str(exc))))]

    def receive(self, request: Request, now: float) -> list[Action]:
        """What to do with one decoded request (`now`: the monotonic clock)."""
        self.services.metrics.frames_in += 1
        if self.state is SessionState.CLOSED:
            return []
        limited = self._rate(request, now)
        if limited is not None:
            return limited
        if request.type == "pong":
            return []
        if request.type == "ping":
            return [Send({"type": "pong", "id": request.id})]
        if request.type == "hello":
            if self.state is not SessionState.AWAITING_HELLO:
                return [Send(error_frame(request.id, BadRequest("`hello` was answered already")))]
            return self._hello(request)
        if self.state is not SessionState.OPEN:
            return [Send(error_frame(request.id, Unauthorized("send `hello` first")))]
        return [Run(request)]

    def _rate(self, request: Request, now: float) -> list[Action] | None:
        """Frames per second per socket: over the limit, each frame is refused with
        `rate_limited` (so a client waiting on an id is answered); over it again in the
        next seconds, close 4429. None: within the limit."""
        limit = self.services.settings.rate_per_s
        if now - self.window_start >= 1.0:
            self.strikes = self.strikes + 1 if self.window_frames > limit else 0
            self.window_start, self.window_frames = now, 0
        self.window_frames += 1
        if self.window_frames <= limit:
            return None
        if self.strikes >= 2:
            return [Close(4429, "too many frames")]
        if request.id is not None or self.window_frames == limit + 1:
            return [Send(error_frame(request.id, RateLimited(
                f"more than {limit} frames per second; slow down")))]
        return []

    def _hello(self, request: Request) -> list[Action]:
        """Verify the token, admit the principal, answer `welcome` (or close)."""
        try:
            principal = self.services.auth.verify(request.fields.get("token"))
        except Unauthorized as exc:
            return [Close(4401, str(exc)[:120])]
        if not principal.scopes:
            return [Close(4403, "the token grants no scope")]
        if not self.services.admit(principal.name):
            return [Close(4429, "too many connections for this principal")]
        self.admitted = principal.name
        self.principal = principal
        self._to(SessionState.OPEN)
        s = self.services.settings
        return [Send({"type": "welcome", "id": request.id, "session": self.id, "node": s.node_id,
                      "heartbeat_s": s.heartbeat_s,
                      "limits": {"max_frame_bytes": s.max_frame_bytes,
                                 "max_subscriptions": s.max_subscriptions, "rate_per_s": s.rate_per_s,
                                 "max_input_bytes": s.max_input_bytes,
                                 "max_json_depth": s.max_json_depth}})]

    def require_principal(self) -> Principal:
        if self.principal is None:
            raise Unauthorized("send `hello` first")
        return self.principal

    # subscriptions

    def add_subscription(self, sub: Subscription) -> None:
        old = self.subscriptions.get(sub.channel)
        if old is not None:
            self.services.hub.remove(old)
        elif len(self.subscriptions) >= self.services.settings.max_subscriptions:
            raise BadRequest(f"at most {self.services.settings.max_subscriptions} subscriptions per socket")
        self.subscriptions[sub.channel] = sub
        self.services.hub.add(sub)

    def drop_subscription(self, sub: Subscription) -> None:
        self.services.hub.remove(sub)
        if self.subscriptions.get(sub.channel) is sub:
            del self.subscriptions[sub.channel]

    def closed(self) -> None:
        """The socket ended: release admission once, drop every subscription. Idempotent."""
        if self.admitted is not None:
            self.services.release(self.admitted)
            self.admitted = None
        if self.state is not SessionState.CLOSED:
            self._to(SessionState.CLOSED)
        for sub in list(self.subscriptions.values()):
            self.services.hub.remove(sub)
        self.subscriptions.clear()
