"""A server node: the listener, its sockets, the fan-out hub and the request handlers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Mapping
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from events.aio import wait_event
from events.errors import TaskcastError
from events.kinds import KindSpec
from events.log import EventLog
from events.projector import Projector
from server.auth import Auth, origin_of
from server.commands import handlers
from server.connection import Connection
from server.fanout import Fanout
from server.http import READY_WITHIN_S, Http, Metrics
from server.hub import Hub
from server.session import SessionState
from server.settings import Settings

log = logging.getLogger("taskcast.node")

SHUTDOWN_GRACE_S = 5.0


class Node:
    def __init__(self, settings: Settings, log_: EventLog, redis: Redis,
                 kinds: Mapping[str, KindSpec]) -> None:
        self.settings = settings
        self.log = log_
        self.redis = redis
        self.kinds = dict(kinds)
        self.auth = Auth(settings.secret, settings.allowed_origins)
        self.hub = Hub()
        self.projector = Projector(log_)
        self.fanout = Fanout(redis, settings.channel, self.hub, log_, self.projector)
        self.metrics = Metrics()
        self.http = Http(self)
        self.handlers = handlers()
        self.connections: set[Connection] = set()  # open websocket sessions
        self.transports: set[asyncio.Transport] = set()  # every TCP connection, HTTP included
        self.server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._all_closed = asyncio.Event()
        self.failed = asyncio.Event()  # a background loop died: the process should stop
        self._per_principal: dict[str, int] = {}
        self.frame_limits = settings.frame_limits()

    def own_origins(self) -> tuple[str, ...]:
        """The browser origins of this server itself: its public URL, and its loopback
        addresses on its port (where the dashboard it serves is opened in development)."""
        port = self.settings.port
        own = [f"http://{host}:{port}" for host in ("127.0.0.1", "localhost", "[::1]")]
        if self.settings.public_url and (public := origin_of(self.settings.public_url)):
            own.append(public)
        return tuple(own)

    def origin_allowed(self, origin: str) -> bool:
        """Whether a browser page of `origin` may open a socket (server/auth.py says why the
        request's Host header plays no part)."""
        return self.auth.origin_allowed(origin, self.own_origins())

    def admit(self, principal: str) -> bool:
        """Count a socket against its principal's limit; False when over it."""
        count = self._per_principal.get(principal, 0)
        if count >= self.settings.max_connections_per_principal:
            return False
        self._per_principal[principal] = count + 1
        return True

    def release(self, principal: str) -> None:
        count = self._per_principal.get(principal, 0) - 1
        if count > 0:
            self._per_principal[principal] = count
        else:
            self._per_principal.pop(principal, None)

    def forget(self, conn: Connection) -> None:
        """A socket ended."""
        self.connections.discard(conn)
        if not self.connections:
            self._all_closed.set()

    async def start(self) -> None:
        """Start the fan-out and sweeper loops, then accept connections."""
        self._loops = [asyncio.create_task(self.fanout.run(), name="node.fanout"),
                       asyncio.create_task(self._sweep(), name="node.sweep")]
        for loop_task in self._loops:
            loop_task.add_done_callback(self._loop_died)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: Connection(self), self.settings.host,
                                               self.settings.port, backlog=4096)
        sockets = self.server.sockets
        if sockets and self.settings.port == 0:
            self.settings = self.settings.with_(port=sockets[0].getsockname()[1])

    def _loop_died(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.critical("%s died; the node stops", task.get_name(), exc_info=task.exception())
            self.failed.set()

    async def stop(self) -> None:
        """Shut down, in order: stop accepting; close every socket with 1001 (clients resume
        elsewhere with `since`); wait up to SHUTDOWN_GRACE_S for them; abort every connection
        left (HTTP and unfinished handshakes too); cancel and await the loops and the request
        tasks; wait (time-boxed) for the listener to close. Idempotent."""
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.close(1001, "server going away")
        if self.connections:
            self._all_closed.clear()
            await wait_event(self._all_closed, SHUTDOWN_GRACE_S)
        for transport in list(self.transports):
            transport.abort()
        for task in [*self._loops, *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._loops, *self._tasks, return_exceptions=True)
        self._loops = []
        if self.server is not None:
            try:
                async with asyncio.timeout(SHUTDOWN_GRACE_S):
                    await self.server.wait_closed()
            except TimeoutError:
                log.warning("the listener did not close in time")
            self.server = None

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a request's coroutine as a task the node owns (cancelled at shutdown)."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def readiness(self) -> dict[str, bool]:
        """PostgreSQL answers, and relay messages actually arrive here through Redis."""
        checks = {"postgres": False, "redis": False, "relay_messages": False}
        try:
            async with asyncio.timeout(1.0):
                await self.log.ping()
            checks["postgres"] = True
        except (TaskcastError, TimeoutError):
            pass
        try:
            async with asyncio.timeout(1.0):
                await self.redis.ping()
            checks["redis"] = True
        except (RedisError, OSError, TimeoutError):
            pass
        checks["relay_messages"] = time.monotonic() - self.fanout.last_message_at < READY_WITHIN_S
        return checks

    async def _sweep(self) -> None:
        """Once a second: the hello timeout, the client-silence timeout, server pings."""
        s = self.settings
        serial = 0
        while True:
            wall = time.time()
            await asyncio.sleep(min(1.0, s.hello_timeout_s / 2, s.heartbeat_s / 2))
            now = time.monotonic()
            for conn in list(self.connections):
                try:
                    serial = self._sweep_one(conn, wall, now, serial)
                except Exception:  # one socket's problem (invariant 9): the sweep goes on
                    log.exception("sweeping a connection failed; closing it")
                    conn.close(4500, "internal error")

    def _sweep_one(self, conn: Connection, wall: float, now: float, serial: int) -> int:
        s = self.settings
        session = conn.session
        if session is None or conn.closing:
            return serial
        if session.state is SessionState.AWAITING_HELLO:
            if now - conn.opened_at > s.hello_timeout_s:
                conn.close(4408, "no hello")
        elif session.principal is not None and session.principal.expires_at is not None \
                and wall >= session.principal.expires_at:
            conn.close(4401, "token expired")
        elif now - conn.last_in > 2 * s.heartbeat_s:
            conn.close(4408, "client silent")
        elif now - conn.last_out > s.heartbeat_s or (
                now - conn.last_in > s.heartbeat_s and now - conn.last_ping > s.heartbeat_s):
            # Idle, or the client has been quiet: a ping it answers keeps it open.
            serial += 1
            conn.send({"type": "ping", "id": f"srv-{serial}"})
            conn.last_ping = now
        return serial
