"""A server node: the listener, its sockets, the fan-out and the request handlers, composed."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from redis.exceptions import RedisError

from events.aio import pause, stop_tasks, wait_event
from events.bound import Bound
from events.errors import TaskcastError
from events.kind import KindSpec
from events.log import EventLog
from events.relay.bus import Client
from server.fanout.receiver import Fanout
from server.handlers.commands import handlers
from server.protocol.session import SessionState
from server.services import Services
from server.settings import Settings
from server.transport import api
from server.transport.connection import Connection
from server.transport.http import READY_WITHIN_S, Http
from server.transport.metrics import Metrics

log = logging.getLogger("taskcast.node")

SHUTDOWN_GRACE_S = 5.0
BOUND_WITHIN_S = 1.0  # /metrics answers without the read-bound lines rather than wait longer


class Node:
    """A gateway node: composes the parts (services, fan-out, HTTP, the listener) and runs
    their loops. Nothing imports it: each part sees only `Services`."""

    def __init__(self, settings: Settings, log_: EventLog, redis: Client,
                 kinds: Mapping[str, KindSpec]) -> None:
        self.services = services = Services(settings, log_, kinds, handlers())
        self.redis = redis
        self.fanout = Fanout(redis, settings.channel, services.hub, log_, services.projector)
        services.http = Http(services, self.readiness, self.render_metrics, api.routes(services))
        self.server: asyncio.Server | None = None
        self._loops: list[asyncio.Task[None]] = []
        self.failed = asyncio.Event()  # a background loop died: the process should stop

    @property
    def settings(self) -> Settings:
        return self.services.settings

    @property
    def connections(self) -> set[Connection]:
        return self.services.connections

    @property
    def metrics(self) -> Metrics:
        return self.services.metrics

    async def start(self) -> None:
        """Start the fan-out and sweeper loops, then accept connections."""
        self._loops = [asyncio.create_task(self.fanout.run(), name="node.fanout"),
                       asyncio.create_task(self._sweep(), name="node.sweep")]
        for loop_task in self._loops:
            loop_task.add_done_callback(self._loop_died)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: Connection(self.services), self.settings.host,
                                               self.settings.port, backlog=4096,
                                               reuse_port=self.settings.reuse_port)
        sockets = self.server.sockets
        if sockets and self.settings.port == 0:
            self.services.settings = self.settings.with_(port=sockets[0].getsockname()[1])

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
            self.services.all_closed.clear()
            await wait_event(self.services.all_closed, SHUTDOWN_GRACE_S)
        for transport in list(self.services.transports):
            transport.abort()
        tasks = [*self._loops, *self.services.tasks]
        if tasks:
            # Quietly: a loop's death was logged by _loop_died, a request's by its handler.
            await stop_tasks(tasks, SHUTDOWN_GRACE_S, log, report_errors=False)
        self._loops = []
        if self.server is not None:
            try:
                async with asyncio.timeout(SHUTDOWN_GRACE_S):
                    await self.server.wait_closed()
            except TimeoutError:
                log.warning("the listener did not close in time")
            self.server = None

    async def render_metrics(self) -> str:
        """/metrics, with the log's read bound when PostgreSQL answers within BOUND_WITHIN_S
        (otherwise the other lines still answer)."""
        bound: tuple[Bound, int] | None = None
        try:
            async with asyncio.timeout(BOUND_WITHIN_S):
                now = await self.services.log.bound()
                bound = now, await self.services.log.events_behind(now)
        except (TaskcastError, TimeoutError):
            pass
        return self.services.metrics.render(self.services, self.fanout, bound)

    async def readiness(self) -> dict[str, bool]:
        """PostgreSQL answers, and relay messages actually arrive here through Redis."""
        checks = {"postgres": False, "redis": False, "relay_messages": False}
        try:
            async with asyncio.timeout(1.0):
                await self.services.log.ping()
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
            await pause(min(1.0, s.hello_timeout_s / 2, s.heartbeat_s / 2))
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
