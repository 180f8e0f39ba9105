"""What a node's parts share: all that connections, sessions and handlers see of their node.

The Node composes the parts and owns their lifecycle; nothing imports the Node. Each part
gets this object instead: settings, the log, the kinds, auth, the hub, metrics, the
request handlers, the sockets registry, admission per principal, and the tasks it may
spawn (owned here, cancelled at the node's stop).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from events.kind import KindSpec
from events.log import EventLog
from events.relay.projector import Projector
from server.fanout.hub import Hub
from server.protocol.auth import Auth, origin_of
from server.protocol.frames import FrameLimits
from server.settings import Settings
from server.transport.metrics import Metrics

if TYPE_CHECKING:
    from server.protocol.session import Handler
    from server.transport.connection import Connection
    from server.transport.http import Http


class Services:
    def __init__(self, settings: Settings, log: EventLog, kinds: Mapping[str, KindSpec],
                 handlers: Mapping[str, Handler]) -> None:
        self.settings = settings
        self.log = log
        self.kinds = dict(kinds)
        self.handlers = dict(handlers)
        self.auth = Auth(settings.secret, settings.allowed_origins)
        self.hub = Hub()
        self.projector = Projector(log)
        self.metrics = Metrics()
        self.frame_limits: FrameLimits = settings.frame_limits()
        self.http: Http | None = None  # plain HTTP (set by the node)
        self.connections: set[Connection] = set()  # open websocket sessions
        self.transports: set[asyncio.Transport] = set()  # every TCP connection, HTTP included
        self.all_closed = asyncio.Event()
        self.tasks: set[asyncio.Task[Any]] = set()
        self._per_principal: dict[str, int] = {}

    # sockets

    def forget(self, conn: Connection) -> None:
        """A socket ended."""
        self.connections.discard(conn)
        if not self.connections:
            self.all_closed.set()

    def own_origins(self) -> tuple[str, ...]:
        """The browser origins of this server itself: its public URL, and its loopback
        addresses on its port (where the dashboard it serves is opened in development)."""
        port = self.settings.port
        own = [f"http://{host}:{port}" for host in ("127.0.0.1", "localhost", "[::1]")]
        if self.settings.public_url and (public := origin_of(self.settings.public_url)):
            own.append(public)
        return tuple(own)

    def origin_allowed(self, origin: str) -> bool:
        """Whether a browser page of `origin` may open a socket (server/protocol/auth.py says
        why the request's Host header plays no part)."""
        return self.auth.origin_allowed(origin, self.own_origins())

    # admission

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

    def admitted(self) -> dict[str, int]:
        """Sockets counted per principal (for tests and /metrics)."""
        return dict(self._per_principal)

    # tasks

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a request's coroutine as a task the node owns (cancelled at its stop)."""
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
