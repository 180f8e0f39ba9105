"""A small asyncio client for taskcast, written only against its wire protocol (PROTOCOL.md, v1).

It needs nothing but the `websockets` library (`pip install websockets`); copy this file into
your project. What it does for you:

- one websocket, `hello`, and the answers to your requests matched by `id`;
- commands (`create`, `cancel`, `answer`, `retry`) that return their `ack`, each with an
  idempotency `key`, so a command in flight when the connection drops is sent again safely;
- queries (`get`, `list`, `history`) that return their `result.data`;
- subscriptions you read with `async for update in subscription`;
- reconnection with exponential backoff and full jitter after a drop (close 1001, 4408, 4429,
  4500, or none at all), each subscription resumed with `since` = the last position it
  received, and updates deduplicated by task version, so no update is missed or seen twice.
  After close 1009, 4401 or 4403 it stops: retrying unchanged cannot help.

    async with TaskcastClient("ws://127.0.0.1:8000/ws") as client:
        ack, updates = await client.create_and_follow("demo", "project:1", {"steps": 3})
        async for update in updates:
            print(update.version, update.type, update.data)
            if update.task["status"] in TERMINAL:
                break

One caveat of `create_and_follow`: if the socket drops after the ack but before the first
update arrived, the stream resumes after the ack's position, i.e. after `task.created`
(version 1, whose content the ack already told you).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

log = logging.getLogger("taskcast_client")

SUBPROTOCOL = "taskcast.v1"
TERMINAL = frozenset({"completed", "failed", "cancelled", "timed_out"})
_CLOSE_ERRORS = {1009: "too_large", 4401: "unauthorized", 4403: "forbidden"}
FINAL_CLOSE_CODES = frozenset(_CLOSE_ERRORS)  # PROTOCOL.md: do not retry these unchanged
Frame = dict[str, Any]


class TaskcastError(Exception):
    """An `error` frame answering a request: `code` is PROTOCOL.md's error code."""

    def __init__(self, code: str, message: str, retryable: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.retryable = retryable


class ConnectionRefused(TaskcastError):
    """The server refused this client for good (close 4401, 4403 or 1009, or a rejected
    handshake): reconnecting unchanged cannot help."""


class ClientClosed(Exception):
    """The client was closed while a request or a subscription was still waiting."""


@dataclass(frozen=True)
class Update:
    """One `update` frame: an event of a task, and the task's view after it."""

    channel: str
    position: str
    event: Frame
    task: Frame

    @property
    def task_id(self) -> str:
        return str(self.event["task"])

    @property
    def version(self) -> int:
        return int(self.event["version"])

    @property
    def type(self) -> str:
        return str(self.event["type"])

    @property
    def data(self) -> Frame:
        return dict(self.event.get("data") or {})


class Subscription:
    """One channel (`task:<id>`, `scope:<scope>` or `all`). Iterate it for its updates.

    `views` holds the latest view of every task seen on the channel (from the snapshot and
    from updates); `position` is the last position received, where a resume starts."""

    def __init__(self, client: TaskcastClient, channel: str, *, since: str | None,
                 snapshot: bool, queue_size: int) -> None:
        self.client = client
        self.channel = channel
        self.position = since
        self.snapshot = snapshot
        self.views: dict[str, Frame] = {}
        self.versions: dict[str, int] = {}
        self.ready = asyncio.Event()  # set by the first `subscribed` answer
        self.socket = 0  # the generation of the socket it was last subscribed on
        self.error: BaseException | None = None
        # Bounded: when the reader of this subscription is slow, the socket's reading waits,
        # the server's buffer fills, and the server sends `resync` (which is handled here).
        self._queue: asyncio.Queue[Update | BaseException | None] = asyncio.Queue(queue_size)

    def subscribe_frame(self) -> Frame:
        """The `subscribe` frame that starts (or resumes) this subscription."""
        frame: Frame = {"type": "subscribe", "channel": self.channel}
        if self.position is not None:
            frame["since"] = self.position
        elif self.snapshot:
            frame["snapshot"] = True
        return frame

    def on_subscribed(self, answer: Frame) -> None:
        # Resumed (`recovered`): the stream continues after our own position. Otherwise
        # (new, or a resume the server could not serve) it starts at the answer's.
        if not answer.get("recovered") or self.position is None:
            self.position = answer.get("position") or self.position
        for view in answer.get("tasks") or []:
            self._know(view)
        self.ready.set()

    def _know(self, view: Frame) -> bool:
        """Record a view; False when its version is not newer than what is known."""
        task, version = view["id"], int(view["version"])
        if version <= self.versions.get(task, 0):
            return False
        self.versions[task], self.views[task] = version, view
        return True

    async def offer(self, update: Update) -> None:
        self.position = update.position  # updates arrive in log order
        if update.version <= self.versions.get(update.task_id, 0):
            return  # seen already (a resume overlapping what was delivered)
        self._know(update.task)
        self.versions[update.task_id] = update.version
        await self._queue.put(update)

    def fail(self, error: BaseException | None) -> None:
        """End the iteration: with `error` raised to the reader, or cleanly when None."""
        self.error = error
        self.ready.set()
        if self._queue.full():  # make room for the end marker: the reader stops anyway
            self._queue.get_nowait()
        self._queue.put_nowait(error)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Update:
        item = await self._queue.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    async def close(self) -> None:
        """Unsubscribe; the iteration ends."""
        await self.client.unsubscribe(self)


@dataclass
class _Pending:
    frame: Frame
    future: asyncio.Future[Frame] | None
    on_answer: Callable[[Frame], None] | None = None
    resend: bool = True  # sent again after a reconnect (commands carry a key: safe)
    socket: int = 0  # the generation of the socket it was last sent on


@dataclass
class _Backoff:
    base_s: float
    max_s: float
    attempt: int = field(default=0)

    def next_delay(self) -> float:
        """Exponential backoff with full jitter: uniform in [0, min(max, base * 2^n)]."""
        self.attempt += 1
        return random.uniform(0, min(self.max_s, self.base_s * 2 ** self.attempt))


class TaskcastClient:
    """A reconnecting taskcast client. Use `async with TaskcastClient(url) as client:`."""

    def __init__(self, url: str, *, token: str | None = None, name: str = "taskcast_client/1",
                 backoff_base_s: float = 0.25, backoff_max_s: float = 10.0,
                 request_timeout_s: float = 30.0, open_timeout_s: float = 10.0,
                 queue_size: int = 1000) -> None:
        self.url = url
        self.token = token
        self.name = name
        self.request_timeout_s = request_timeout_s
        self.open_timeout_s = open_timeout_s
        self.queue_size = queue_size
        self.welcome: Frame = {}
        self.connected = asyncio.Event()
        self.reconnects = 0
        self._backoff = _Backoff(backoff_base_s, backoff_max_s)
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._subs: dict[str, Subscription] = {}
        self._ws: ClientConnection | None = None
        self._generation = 0  # counts sockets; what was sent on which is tracked by it
        self._runner: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._last_sent = time.monotonic()

    # lifecycle

    async def __aenter__(self) -> TaskcastClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Connect and say hello. Raises OSError, TimeoutError or InvalidHandshake when the
        server cannot be reached, ConnectionRefused when it refuses this client."""
        ws = await self._connect()
        self._runner = asyncio.create_task(self._run(ws), name="taskcast-client")

    async def close(self) -> None:
        """Close the socket; waiting requests and subscriptions end with ClientClosed."""
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
        self._fail(ClientClosed("the client was closed"), clean=True)

    async def _connect(self) -> ClientConnection:
        ws = await connect(self.url, subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                           open_timeout=self.open_timeout_s, max_size=None)
        try:
            hello: Frame = {"type": "hello", "id": "hello", "client": self.name}
            if self.token:
                hello["token"] = self.token
            await ws.send(json.dumps(hello))
            async with asyncio.timeout(self.open_timeout_s):
                while True:  # nothing but the answer to hello can come first (no subscriptions)
                    frame = json.loads(await ws.recv())
                    if frame.get("id") == "hello":
                        break
        except ConnectionClosed as closed:
            if closed.rcvd is not None and closed.rcvd.code in FINAL_CLOSE_CODES:
                raise ConnectionRefused(_CLOSE_ERRORS[closed.rcvd.code],
                                        f"closed with {closed.rcvd.code}: {closed.rcvd.reason}") from None
            raise
        except BaseException:
            await ws.close()
            raise
        if frame.get("type") != "welcome":
            await ws.close()
            raise TaskcastError(frame.get("code", "internal"), frame.get("message", str(frame)))
        self.welcome = frame
        return ws

    async def _run(self, ws: ClientConnection) -> None:
        """Serve one socket after another until the server refuses us or we are closed."""
        while True:
            code = await self._serve(ws)
            self.connected.clear()
            self._ws = None
            if code in FINAL_CLOSE_CODES:
                self._fail(ConnectionRefused(_CLOSE_ERRORS[code], f"the server closed the socket: {code}"))
                return
            while True:
                delay = self._backoff.next_delay()
                log.info("taskcast: connection lost (close %s); reconnecting in %.2f s", code, delay)
                await asyncio.sleep(delay)
                try:
                    ws = await self._connect()
                    break
                except ConnectionRefused as exc:
                    self._fail(exc)
                    return
                except InvalidStatus as exc:
                    if exc.response.status_code in (401, 403):
                        self._fail(ConnectionRefused("forbidden", f"handshake refused: {exc}"))
                        return
                except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                    log.debug("taskcast: reconnect failed: %r", exc)
            self.reconnects += 1

    async def _serve(self, ws: ClientConnection) -> int | None:
        """Resume every subscription, resend what was in flight, then read until the socket
        closes; its close code (None when it dropped without one)."""
        self._ws = ws
        self._generation += 1
        keepalive = asyncio.create_task(self._keepalive(ws), name="taskcast-keepalive")
        try:
            # Set first: from here on new requests send themselves; each one is sent once per
            # socket (the generation marks it), whichever side gets to it.
            self.connected.set()
            for sub in list(self._subs.values()):
                if sub.socket != self._generation:
                    await self._subscribe_on_socket(sub)
            for id_, pending in list(self._pending.items()):
                if pending.resend and pending.socket != self._generation:
                    await self._send_pending(id_, pending)
            self._backoff.attempt = 0
            async for raw in ws:
                await self._dispatch(json.loads(raw))
        except ConnectionClosed:
            pass
        finally:
            keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keepalive
        return ws.close_code

    async def _keepalive(self, ws: ClientConnection) -> None:
        """Send a ping when we have sent nothing for half of heartbeat_s: a client silent for
        2 x heartbeat_s is closed by the server (4408)."""
        every_s = float(self.welcome.get("heartbeat_s", 25)) / 2
        while True:
            await asyncio.sleep(every_s)
            if time.monotonic() - self._last_sent >= every_s:
                with contextlib.suppress(ConnectionClosed):
                    await self._send({"type": "ping", "id": f"ka-{next(self._ids)}"})

    async def _send(self, frame: Frame) -> None:
        """Send on the current socket; a send on a dropped socket is dropped (it is resent or
        resubscribed after the reconnect)."""
        if self._ws is None:
            return
        try:
            await self._ws.send(json.dumps(frame))
            self._last_sent = time.monotonic()
        except ConnectionClosed:
            pass

    async def _dispatch(self, frame: Frame) -> None:
        kind = frame.get("type")
        if kind == "update":
            sub = self._subs.get(frame["channel"])
            if sub is not None:
                await sub.offer(Update(frame["channel"], frame["position"], frame["event"], frame["task"]))
        elif kind == "resync":
            sub = self._subs.get(frame["channel"])
            if sub is not None:  # the server stopped it; resume where it says
                sub.position = frame.get("position") or sub.position
                await self._subscribe_on_socket(sub)
        elif kind == "ping":
            await self._send({"type": "pong", "id": frame.get("id")})
        elif kind == "pong":
            pass
        elif frame.get("id") in self._pending:
            pending = self._pending.pop(frame["id"])
            # Run synchronously, before the next frame is read: a create's subscription must
            # exist before its first update is dispatched.
            if pending.on_answer is not None:
                pending.on_answer(frame)
            if pending.future is not None and not pending.future.done():
                pending.future.set_result(frame)
        elif kind == "error":
            log.warning("taskcast: %s: %s", frame.get("code"), frame.get("message"))

    def _fail(self, error: BaseException, *, clean: bool = False) -> None:
        self._failure = error
        for pending in self._pending.values():
            if pending.future is not None and not pending.future.done():
                pending.future.set_exception(error)
        self._pending.clear()
        for sub in self._subs.values():
            sub.fail(None if clean else error)
        self._subs.clear()

    # requests

    async def request(self, frame: Frame, *, on_answer: Callable[[Frame], None] | None = None,
                      resend: bool = True) -> Frame:
        """Send `frame` with a fresh id; the frame that answers it. Raises TaskcastError for an
        `error` answer, TimeoutError after request_timeout_s, ConnectionRefused or ClientClosed
        when the client stopped."""
        if self._failure is not None:
            raise self._failure
        id_ = next(self._ids)
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        pending = self._pending[id_] = _Pending(frame, future, on_answer, resend)
        try:
            if self.connected.is_set():
                await self._send_pending(id_, pending)
            async with asyncio.timeout(self.request_timeout_s):
                answer = await future
        finally:
            self._pending.pop(id_, None)
        if answer.get("type") == "error":
            raise TaskcastError(answer.get("code", "internal"), answer.get("message", ""),
                                bool(answer.get("retryable")))
        return answer

    async def _send_pending(self, id_: int, pending: _Pending) -> None:
        pending.socket = self._generation
        await self._send({**pending.frame, "id": id_})

    async def _command(self, frame: Frame, key: str | None) -> Frame:
        return await self.request({**frame, "key": key or uuid.uuid4().hex})

    async def create(self, kind: str, scope: str, input: Frame, *, labels: list[str] | None = None,
                     depends_on: list[str] | None = None, timeout_s: float | None = None,
                     priority: int | None = None, key: str | None = None) -> Frame:
        """Create a task; its ack ({task, status, position, duplicate}). Raises TaskcastError."""
        frame = _without_none({"type": "create", "kind": kind, "scope": scope, "input": input,
                               "labels": labels, "depends_on": depends_on, "timeout_s": timeout_s,
                               "priority": priority})
        return await self._command(frame, key)

    async def create_and_follow(self, kind: str, scope: str, input: Frame, *,
                                key: str | None = None, **options: Any) -> tuple[Frame, Subscription]:
        """Create a task and subscribe to its channel in the same request (no event of the
        task can be missed); its ack and its Subscription. Raises TaskcastError."""
        holder: list[Subscription] = []

        def follow(answer: Frame) -> None:
            if answer.get("type") == "ack":
                channel = f"task:{answer['task']}"
                sub = Subscription(self, channel, since=answer["position"], snapshot=False,
                                   queue_size=self.queue_size)
                sub.ready.set()
                self._subs[channel] = sub
                holder.append(sub)

        frame = _without_none({"type": "create", "kind": kind, "scope": scope, "input": input,
                               "subscribe": True, "key": key or uuid.uuid4().hex,
                               **options})
        ack = await self.request(frame, on_answer=follow)
        return ack, holder[0]

    async def cancel(self, task: str, reason: str | None = None, *, key: str | None = None) -> Frame:
        """Cancel a task; its ack. Raises TaskcastError (`conflict` when it has finished)."""
        return await self._command(_without_none({"type": "cancel", "task": task, "reason": reason}), key)

    async def answer(self, task: str, question: str, answer: Any, *, key: str | None = None) -> Frame:
        """Answer a pending question; the ack. Raises TaskcastError (`conflict`: not pending)."""
        return await self._command({"type": "answer", "task": task, "question": question,
                                    "answer": answer}, key)

    async def retry(self, task: str, *, key: str | None = None) -> Frame:
        """Run a failed, cancelled or timed-out task again; the ack. Raises TaskcastError."""
        return await self._command({"type": "retry", "task": task}, key)

    async def get(self, task: str) -> Frame:
        """The task's view. Raises TaskcastError (`not_found`)."""
        return dict((await self.request({"type": "get", "task": task}))["data"])

    async def list(self, **filters: Any) -> Frame:
        """{tasks, cursor, position}; filters: scope, status (list), kind, label, limit, cursor."""
        return dict((await self.request({"type": "list", **_without_none(filters)}))["data"])

    async def history(self, task: str, *, after: int = 0, limit: int | None = None) -> Frame:
        """{events, more}: the task's events after version `after`."""
        frame = _without_none({"type": "history", "task": task, "after": after, "limit": limit})
        return dict((await self.request(frame))["data"])

    # subscriptions

    async def subscribe(self, channel: str, *, since: str | None = None,
                        snapshot: bool = False) -> Subscription:
        """Subscribe to `channel`; once the server answered, the Subscription to iterate.
        `since`: resume after that position; `snapshot`: start from the current views (in
        `subscription.views`). Raises TaskcastError (`not_found`, `forbidden`, ...)."""
        if channel in self._subs:
            raise ValueError(f"already subscribed to {channel!r}")
        if self._failure is not None:
            raise self._failure
        sub = Subscription(self, channel, since=since, snapshot=snapshot, queue_size=self.queue_size)
        self._subs[channel] = sub
        try:
            if self.connected.is_set():
                await self._subscribe_on_socket(sub)
            async with asyncio.timeout(self.request_timeout_s):
                await sub.ready.wait()
        except BaseException:
            if self._subs.get(channel) is sub:
                del self._subs[channel]
            raise
        if sub.error is not None:
            raise sub.error
        return sub

    async def _subscribe_on_socket(self, sub: Subscription) -> None:
        """Send the subscribe frame for `sub` on the current socket (its answer completes it)."""
        def answered(answer: Frame) -> None:
            if answer.get("type") == "subscribed":
                sub.on_subscribed(answer)
            elif self._subs.get(sub.channel) is sub:
                del self._subs[sub.channel]
                sub.fail(TaskcastError(answer.get("code", "internal"), answer.get("message", "")))

        id_ = next(self._ids)
        sub.socket = self._generation
        self._pending[id_] = _Pending({}, None, answered, resend=False)
        await self._send({**sub.subscribe_frame(), "id": id_})

    async def unsubscribe(self, sub: Subscription) -> None:
        """Stop `sub`; its iteration ends."""
        if self._subs.get(sub.channel) is sub:
            del self._subs[sub.channel]
            sub.fail(None)
            if self.connected.is_set():  # else the next socket simply does not resubscribe it
                with contextlib.suppress(TaskcastError, TimeoutError):
                    await self.request({"type": "unsubscribe", "channel": sub.channel}, resend=False)


def _without_none(frame: Frame) -> Frame:
    return {k: v for k, v in frame.items() if v is not None}
