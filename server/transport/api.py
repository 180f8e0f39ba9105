"""The HTTP API for backends and scripts (PROTOCOL.md, HTTP API): the websocket's commands
and queries as routes, for clients that hold no socket.

Nothing here re-implements the protocol. Each request becomes the frame a websocket client
would send (`{"type": "create", "id": "http", ...}`), goes through the very edge that
checks every frame (server/protocol/frames.py: same checks, same `bad_request` naming the
field) and the very handler that answers it, run with a `Session` whose peer only records
what the handler sends. What is HTTP's own: the bearer token instead of `hello`, the
`Idempotency-Key` header instead of `key`, status codes and problem bodies instead of
`error` frames, and the rate limit, per principal on this node instead of per socket.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request as HttpRequest
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from events.errors import BadRequest, Forbidden, Internal, RateLimited, TaskcastError, TooLarge, Unauthorized
from events.ids import Position
from server.protocol.auth import Principal
from server.protocol.frames import FrameError, Request, decode
from server.protocol.session import Session
from server.transport import sse
from server.transport.http import problem
from server.transport.openapi import document

if TYPE_CHECKING:
    from server.fanout.hub import Subscription
    from server.services import Services

log = logging.getLogger("taskcast.api")

REQUEST_ID = "http"  # the `id` of every frame built here (answers are stripped of it)
# ASCII digits only: int() also takes "+1", " 1", "1_0" and other scripts' digits.
_INTEGER = re.compile(r"-?[0-9]{1,18}")

Build = Callable[[HttpRequest], Awaitable[dict[str, Any]]]  # an HTTP request -> its frame


class Recorder:
    """The peer of an HTTP request's session: it records the frames a handler sends (a
    command's handler may send its ack itself, then go on). Nothing is ever subscribed
    through it (`subscribe` is refused at the edge), so it is never written updates."""

    def __init__(self, principal: Principal) -> None:
        self.principal = principal
        self.sent: list[dict[str, Any]] = []

    def send(self, frame: dict[str, Any]) -> None:
        self.sent.append(frame)

    def writable(self) -> bool:
        return True

    async def drained(self) -> None:
        return None

    def write_update(self, sub: Subscription, before: Position, frame: bytes) -> None:
        return None

    def flush(self) -> None:
        return None

    def resync(self, sub: Subscription) -> None:
        return None

    def may_read(self, scope: str) -> bool:
        return self.principal.may(scope)


class RateLimit:
    """Requests per second per principal: a token bucket each, `rate` deep, refilled at
    `rate` per second. A bucket idle for a second is full again, the same as none, so idle
    ones are dropped (once a second): memory follows the principals active right now."""

    def __init__(self) -> None:
        self.buckets: dict[str, tuple[float, float]] = {}  # principal -> (tokens, at)
        self.swept = 0.0

    def allow(self, principal: str, rate: int, now: float) -> bool:
        self._forget_idle(now)
        tokens, at = self.buckets.get(principal, (float(rate), now))
        tokens = min(float(rate), tokens + (now - at) * rate)
        allowed = tokens >= 1.0
        self.buckets[principal] = (tokens - 1.0 if allowed else tokens, now)
        return allowed

    def _forget_idle(self, now: float) -> None:
        if now - self.swept < 1.0:
            return
        self.swept = now
        self.buckets = {p: b for p, b in self.buckets.items() if now - b[1] < 1.0}


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers, media_type="application/json")


class Api:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.rate = RateLimit()

    # the edge

    def principal(self, request: HttpRequest, *, query_token: bool = False) -> Principal:
        """The principal of the bearer token, checked as `hello` checks its `token` (no
        header: as a `hello` without one). With `query_token`, a request without the header
        may carry it as `access_token` in the query (RFC 6750, 2.3: a browser's
        EventSource cannot set headers). Raises Unauthorized, Forbidden, BadRequest."""
        header = request.headers.get("authorization")
        token = None
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer":
                raise Unauthorized("the Authorization header must be `Bearer <token>`")
        elif query_token:
            token = request.query_params.get("access_token")
        hello = self.decode({"type": "hello", "token": token.strip() if token is not None else None})
        principal = self.services.auth.verify(hello.fields.get("token"))
        if not principal.scopes:
            raise Forbidden("the token grants no scope")
        return principal

    def limit(self, principal: Principal) -> None:
        rate = self.services.settings.rate_per_s
        if not self.rate.allow(principal.name, rate, time.monotonic()):
            raise RateLimited(f"more than {rate} requests per second; slow down")

    async def body(self, request: HttpRequest) -> dict[str, Any]:
        """The request's JSON object ({} when there is none), read up to `max_frame_bytes`."""
        limit = self.services.settings.max_frame_bytes
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"the request body is larger than {limit} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            return {}
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise BadRequest("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    def decode(self, frame: dict[str, Any]) -> Request:
        """`frame` through the websocket's edge: the same checks, the same messages."""
        frame = {**frame, "id": REQUEST_ID}
        try:
            message = orjson.dumps(frame)
        except orjson.JSONEncodeError:  # nested deeper than the encoder goes (the parser went)
            raise BadRequest(f"`{_unencodable(frame)}` is nested more than "
                             f"{self.services.frame_limits.max_json_depth} levels") from None
        try:
            return decode(message, self.services.frame_limits)
        except FrameError as exc:
            self.services.metrics.bad_frames += 1
            raise BadRequest(str(exc)) from None

    # running a frame

    async def run(self, principal: Principal, frame: dict[str, Any]) -> dict[str, Any]:
        """The answer of the frame's handler (an ack or a result frame)."""
        request = self.decode(frame)
        peer = Recorder(principal)
        session = Session(self.services, peer)
        session.principal = principal  # the bearer token stands for `hello` (no socket is admitted)
        self.services.metrics.frames_in += 1
        try:
            answer = await self.services.handlers[request.type](session, request)
        except Exception:
            if not peer.sent:
                raise
            # Committed and acked already (a create's dependencies are settled after its
            # ack): the ack stands, as it does on a socket.
            log.exception("%s failed after its ack", request.type)
            answer = None
        return answer if answer is not None else peer.sent[0]

    async def serve(self, request: HttpRequest, build: Build) -> dict[str, Any] | Response:
        """Authorize, limit, build the frame and run it; an error as its problem."""
        try:
            principal = self.principal(request)
            self.limit(principal)
            return await self.run(principal, await build(request))
        except TaskcastError as exc:
            return problem(exc)
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.url.path)
            self.services.metrics.internal_errors += 1
            return problem(Internal("internal error"))

    # routes

    async def create(self, request: HttpRequest) -> Response:
        async def build(request: HttpRequest) -> dict[str, Any]:
            body = await self.body(request)
            if body.get("subscribe") is not None:
                raise BadRequest("`subscribe` is not accepted over HTTP (subscribe on /ws or /v1/stream)")
            return command("create", body, request)

        answer = await self.serve(request, build)
        if isinstance(answer, Response):
            return answer
        ack = _ack(answer)
        if ack["duplicate"]:
            return json_response(ack)
        return json_response(ack, 201, {"Location": f"/v1/tasks/{ack['task']}"})

    def task_command(self, type_: str) -> Callable[[HttpRequest], Awaitable[Response]]:
        """`cancel`, `answer` or `retry` of the task named by the path."""
        async def build(request: HttpRequest) -> dict[str, Any]:
            body = await self.body(request)
            return command(type_, {**body, "task": request.path_params["id"]}, request)

        async def route(request: HttpRequest) -> Response:
            answer = await self.serve(request, build)
            return answer if isinstance(answer, Response) else json_response(_ack(answer))

        return route

    async def get(self, request: HttpRequest) -> Response:
        async def build(request: HttpRequest) -> dict[str, Any]:
            return {"type": "get", "task": request.path_params["id"]}

        return await self.query(request, build)

    async def list_(self, request: HttpRequest) -> Response:
        async def build(request: HttpRequest) -> dict[str, Any]:
            q = request.query_params
            frame: dict[str, Any] = {"type": "list", **_once(q, "scope", "kind", "label", "cursor"),
                                     **_integers(q, "limit")}
            statuses = q.getlist("status")
            if statuses:
                frame["status"] = [s for value in statuses for s in value.split(",")]
            return frame

        return await self.query(request, build)

    async def history(self, request: HttpRequest) -> Response:
        async def build(request: HttpRequest) -> dict[str, Any]:
            return {"type": "history", "task": request.path_params["id"],
                    **_integers(request.query_params, "after", "limit")}

        return await self.query(request, build)

    async def query(self, request: HttpRequest, build: Build) -> Response:
        answer = await self.serve(request, build)
        return answer if isinstance(answer, Response) else json_response(answer["data"])

    async def stream(self, request: HttpRequest) -> Response:
        """Server-Sent Events of one channel (server/transport/sse.py)."""
        try:
            principal = self.principal(request, query_token=True)
            self.limit(principal)
            return await sse.stream(self.services, principal, request)
        except TaskcastError as exc:
            return problem(exc)

    async def openapi(self, request: HttpRequest) -> Response:
        return json_response(document())


def command(type_: str, fields: dict[str, Any], request: HttpRequest) -> dict[str, Any]:
    """A command's frame: the body's fields, the idempotency key from its header only."""
    frame = {k: v for k, v in fields.items() if k != "key"}
    frame["type"] = type_
    key = request.headers.get("idempotency-key")
    if key is not None:
        frame["key"] = key
    return frame


def _ack(frame: dict[str, Any]) -> dict[str, Any]:
    return {k: frame[k] for k in ("task", "status", "position", "duplicate")}


def _once(query: Any, *names: str) -> dict[str, str]:
    """The query's single-valued parameters that are present (given twice: bad_request)."""
    found = {}
    for name in names:
        values = query.getlist(name)
        if len(values) > 1:
            raise BadRequest(f"`{name}` may be given once")
        if values:
            found[name] = values[0]
    return found


def _integers(query: Any, *names: str) -> dict[str, int]:
    """The query's integer parameters that are present, parsed strictly (their range is
    the frame's to check)."""
    found = {}
    for name, value in _once(query, *names).items():
        if _INTEGER.fullmatch(value) is None:
            raise BadRequest(f"`{name}` must be an integer (at most 18 digits)")
        found[name] = int(value)
    return found


def _unencodable(frame: dict[str, Any]) -> str:
    """The field of `frame` that cannot be encoded."""
    for name, value in frame.items():
        try:
            orjson.dumps(value)
        except orjson.JSONEncodeError:
            return name
    raise AssertionError("every field encodes")


def routes(services: Services) -> list[BaseRoute]:
    """The API's routes (server/transport/http.py mounts them)."""
    api = Api(services)
    return [
        Route("/v1/tasks", api.create, methods=["POST"]),
        Route("/v1/tasks", api.list_, methods=["GET"]),
        Route("/v1/tasks/{id}", api.get, methods=["GET"]),
        Route("/v1/tasks/{id}/events", api.history, methods=["GET"]),
        Route("/v1/tasks/{id}/cancel", api.task_command("cancel"), methods=["POST"]),
        Route("/v1/tasks/{id}/answer", api.task_command("answer"), methods=["POST"]),
        Route("/v1/tasks/{id}/retry", api.task_command("retry"), methods=["POST"]),
        Route("/v1/stream", api.stream, methods=["GET"]),
        Route("/openapi.json", api.openapi, methods=["GET"]),
    ]
