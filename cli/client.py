"""A small client of the wire protocol for the CLI: follows one channel, across reconnects.

It speaks only PROTOCOL.md, like any client outside this repo (the CLI talks to a running
server, possibly another machine's). Deliberately sequential: one socket at a time, one
subscription, requests answered in line, so there is no shared state to guard.

A `Follower` optionally creates a task first (with `subscribe: true`, so no event of it is
missed), then delivers every update of its channel to a `Listener`. After a drop (close 1001,
4408, 4429, 4500, or none) it reconnects with exponential backoff and full jitter and
resumes with `since` = the last position received; updates are deduplicated by task version.
The create is resent with the same idempotency key until it is acked, so it happens once.

Errors: `Refused` (close 1009, 4401, 4403, or a handshake refused with 401/403: retrying
unchanged cannot help) and `RequestFailed` (an `error` frame answering the create or the
subscribe, e.g. `not_found`) end `run`.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

SUBPROTOCOL = Subprotocol("taskcast.v1")
TERMINAL = frozenset({"completed", "failed", "cancelled", "timed_out"})
FINAL_CLOSE_CODES = frozenset({1009, 4401, 4403})
OPEN_TIMEOUT_S = 10.0
Frame = dict[str, Any]


class Refused(Exception):
    """The server refused this client for good; reconnecting unchanged cannot help."""


class RequestFailed(Exception):
    """An `error` frame answered the create or the subscribe."""

    def __init__(self, frame: Frame) -> None:
        super().__init__(f"{frame.get('code')}: {frame.get('message')}")
        self.code = str(frame.get("code"))


class _Dropped(Exception):
    """The socket ended; carries its close code (None: no close frame)."""

    def __init__(self, code: int | None) -> None:
        super().__init__(f"connection closed ({code})")
        self.code = code


@dataclass(frozen=True)
class Update:
    channel: str
    position: str
    event: Frame
    task: Frame


class Listener(Protocol):
    """What the follower reports to."""

    def created(self, ack: Frame) -> bool:
        """The create was acked; True to stop following."""
    def subscribed(self, views: list[Frame]) -> bool:
        """The views a snapshot (or a resume too old for the history) brought; True to stop."""
    def update(self, update: Update) -> bool:
        """Show one update; True to stop following."""
    def connection(self, state: str, detail: str = "") -> None:
        """`connected`, or `reconnecting` (detail: why, and when the next try is)."""


@dataclass
class Backoff:
    base_s: float = 0.25
    max_s: float = 10.0
    attempt: int = 0
    rand: Callable[[float, float], float] = random.uniform

    def next_delay(self) -> float:
        """Full jitter: uniform in [0, min(max_s, base_s * 2^attempt)]."""
        self.attempt += 1
        return self.rand(0.0, min(self.max_s, self.base_s * 2 ** self.attempt))


class Follower:
    def __init__(self, url: str, *, token: str | None = None, channel: str | None = None,
                 create: Frame | None = None, snapshot: bool = True,
                 backoff: Backoff | None = None) -> None:
        if (channel is None) == (create is None):
            raise ValueError("follow a channel or create a task, one of the two")
        self.url = url
        self.token = token
        self.channel = channel
        self.create = None if create is None else {**create, "type": "create", "subscribe": True,
                                                   "key": create.get("key") or uuid.uuid4().hex}
        self.snapshot = snapshot
        self.backoff = backoff or Backoff()
        self.position: str | None = None  # the last position received: where a resume starts
        self.versions: dict[str, int] = {}  # per task, the last version delivered
        self.heartbeat_s = 25.0
        self._ids = itertools.count(1)
        self._last_sent = time.monotonic()

    async def run(self, listener: Listener) -> None:
        """Follow until the listener says stop. Raises Refused, RequestFailed."""
        while True:
            try:
                async with connect(self.url, subprotocols=[SUBPROTOCOL], open_timeout=OPEN_TIMEOUT_S,
                                   max_size=None) as ws:
                    if await self._session(ws, listener):
                        return
                    code = ws.close_code
            except _Dropped as dropped:
                code, why = dropped.code, f"closed with {dropped.code}"
            except InvalidStatus as exc:
                if exc.response.status_code in (401, 403):
                    raise Refused(f"the server refused the handshake: {exc}") from None
                code, why = None, str(exc)
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                code, why = None, str(exc) or type(exc).__name__
            else:
                why = f"closed with {code}"
            if code in FINAL_CLOSE_CODES:
                raise Refused(f"the server closed the connection with {code}"
                              + (" (set TASKCAST_TOKEN / --token)" if code == 4401 else ""))
            delay = self.backoff.next_delay()
            listener.connection("reconnecting", f"{why}; next try in {delay:.1f} s")
            await asyncio.sleep(delay)

    async def _session(self, ws: ClientConnection, listener: Listener) -> bool:
        """Hello, create or (re)subscribe, then updates until the listener stops (True) or
        the socket ends (False)."""
        hello: Frame = {"type": "hello", "client": "taskcast-cli/1"}
        if self.token:
            hello["token"] = self.token
        welcome = await self._request(ws, hello, listener)
        self.heartbeat_s = float(welcome.get("heartbeat_s", 25.0))
        if self.channel is None:
            assert self.create is not None
            ack = await self._request(ws, self.create, listener)
            self.channel, self.position = f"task:{ack['task']}", ack["position"]
            if listener.created(ack):
                return True
        elif await self._subscribe(ws, listener):
            return True
        self.backoff.attempt = 0
        listener.connection("connected")
        while True:
            if await self._handle(ws, await self._receive(ws), listener):
                return True

    async def _subscribe(self, ws: ClientConnection, listener: Listener) -> bool:
        assert self.channel is not None
        frame: Frame = {"type": "subscribe", "channel": self.channel}
        if self.position is not None:
            frame["since"] = self.position
        elif self.snapshot:
            frame["snapshot"] = True
        answer = await self._request(ws, frame, listener)
        # Resumed (`recovered`): the stream continues after our own position. Otherwise
        # (new, or a resume the server could not serve) it starts at the answer's.
        if not answer.get("recovered") or self.position is None:
            self.position = answer.get("position") or self.position
        views = [v for v in answer.get("tasks") or [] if v["version"] > self.versions.get(v["id"], 0)]
        for view in views:
            self.versions[view["id"]] = view["version"]
        return bool(views) and listener.subscribed(views)

    async def _request(self, ws: ClientConnection, frame: Frame, listener: Listener) -> Frame:
        """Send `frame`; its answer (updates arriving meanwhile are handled)."""
        id_ = next(self._ids)
        await self._send(ws, {**frame, "id": id_})
        async with asyncio.timeout(OPEN_TIMEOUT_S * 3):
            while True:
                answer = await self._receive(ws)
                if answer.get("id") == id_ and answer.get("type") not in ("ping", "update"):
                    if answer.get("type") == "error":
                        raise RequestFailed(answer)
                    return answer
                await self._handle(ws, answer, listener)

    async def _handle(self, ws: ClientConnection, frame: Frame, listener: Listener) -> bool:
        kind = frame.get("type")
        if kind == "update" and frame.get("channel") == self.channel:
            self.position = frame["position"]  # updates arrive in log order
            event = frame["event"]
            if event["version"] <= self.versions.get(event["task"], 0):
                return False  # delivered already: a resume overlapping what we had
            self.versions[event["task"]] = event["version"]
            return listener.update(Update(frame["channel"], frame["position"], event, frame["task"]))
        if kind == "resync" and frame.get("channel") == self.channel:
            self.position = frame.get("position") or self.position
            return await self._subscribe(ws, listener)
        elif kind == "ping":
            await self._send(ws, {"type": "pong", "id": frame.get("id")})
        return False

    async def _receive(self, ws: ClientConnection) -> Frame:
        """The next frame; pings the server whenever we have been silent for heartbeat_s / 2
        (a client silent for 2 x heartbeat_s is closed with 4408)."""
        while True:
            quiet_s = self.heartbeat_s / 2 - (time.monotonic() - self._last_sent)
            if quiet_s <= 0:
                await self._send(ws, {"type": "ping", "id": f"cli-{next(self._ids)}"})
                continue
            try:
                raw = await asyncio.wait_for(ws.recv(), quiet_s)
            except TimeoutError:
                continue
            except ConnectionClosed as closed:
                raise _Dropped(closed.rcvd.code if closed.rcvd else None) from None
            frame: Frame = orjson.loads(raw)
            return frame

    async def _send(self, ws: ClientConnection, frame: Frame) -> None:
        try:
            await ws.send(orjson.dumps(frame).decode())
        except ConnectionClosed as closed:
            raise _Dropped(closed.rcvd.code if closed.rcvd else None) from None
        self._last_sent = time.monotonic()
