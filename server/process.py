"""One taskcast process: builds the shared parts once and runs the chosen roles.

Roles: `serve` (a gateway node), `relay`, `workers`. `taskcast dev` runs all three.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from events import db
from events.kinds import KindSpec, as_kind, builtin
from events.log import EventLog
from events.relay import Relay, RelayConfig
from events.waker import Waker
from events.worker import Worker, WorkerConfig
from server.node import Node
from server.settings import Settings

log = logging.getLogger("taskcast")


def load_kinds(paths: Sequence[str], shell_allow: Sequence[str] = (),
               clone_roots: Sequence[str] = ()) -> dict[str, KindSpec]:
    """The built-in kinds plus plugins named `package.module:attr` (a KindSpec, or an async
    function registered under its attribute name). Raises ValueError, ImportError."""
    kinds = builtin(shell_allow, clone_roots=clone_roots)
    for path in paths:
        module_name, sep, attr = path.partition(":")
        if not sep:
            raise ValueError(f"a kind is named package.module:attr, not {path!r}")
        kind = as_kind(attr, getattr(importlib.import_module(module_name), attr))
        kinds[kind.name] = kind
    return kinds


def dump_tasks() -> None:
    """Log every asyncio task and where it waits (SIGUSR1): for a process that will not stop."""
    for task in asyncio.all_tasks():
        frames = []
        coro: Any = task.get_coro()
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
            if frame is not None:
                frames.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
        log.warning("task %s:\n  %s", task.get_name(), "\n  ".join(frames) or repr(task))


@dataclass
class Roles:
    serve: bool = False
    relay: bool = False
    workers: int = 0


class Process:
    """The parts of one process. Use `async with Process(...)`, or `run()` until a signal."""

    def __init__(self, settings: Settings, roles: Roles) -> None:
        self.settings = settings
        self.roles = roles
        self.node: Node | None = None
        self.relay: Relay | None = None
        self.workers: list[Worker] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Process:
        s = self.settings
        kinds = load_kinds(s.kinds, s.shell_allow, s.clone_roots)
        self.pool = await db.create_pool(s.database_url, min_size=1, max_size=20)
        self.redis = Redis.from_url(s.redis_url)
        self.waker = Waker(self.redis, s.channel)
        self._tasks.append(asyncio.create_task(self.waker.run(), name="waker"))
        self.log = EventLog(self.pool, on_append=self.waker.poke)
        if self.roles.relay:
            self.relay = Relay(s.database_url, self.log, self.redis, RelayConfig(channel=s.channel))
            self._tasks.append(asyncio.create_task(self.relay.run(), name="relay"))
        for i in range(self.roles.workers):
            worker = Worker(s.database_url, self.log, kinds,
                            WorkerConfig(concurrency=s.worker_concurrency, lease_s=s.lease_s,
                                         cancel_grace_s=s.cancel_grace_s, scope_limit=s.scope_limit,
                                         retention_s=s.retention_s, workspace_root=s.workspace_root))
            self.workers.append(worker)
            self._tasks.append(asyncio.create_task(worker.run(), name=f"worker-{i}"))
        if self.roles.serve:
            self.node = Node(s, self.log, self.redis, kinds)
            await self.node.start()
            self.settings = self.node.settings
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop, in order: the node (sockets closed with 1001), then the workers (their tasks
        are cancelled; leases expire and others resume them), then the relay; then Redis
        and the pool. Idempotent."""
        if self.node is not None:
            await self.node.stop()
            self.node = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if getattr(self, "redis", None) is not None:
            await self.redis.aclose()
            self.redis = None  # type: ignore[assignment]
        if getattr(self, "pool", None) is not None:
            await self.pool.close()
            self.pool = None  # type: ignore[assignment]

    async def run_until_signal(self, on_ready: Callable[[Process], None] | None = None) -> None:
        """Run until SIGINT or SIGTERM (or until a role's loop dies), then stop in order."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
        async with self:
            if on_ready is not None:
                on_ready(self)
            watch: list[asyncio.Task[Any]] = [asyncio.create_task(stop.wait())]
            if self.node is not None:
                watch.append(asyncio.create_task(self.node.failed.wait()))
            await asyncio.wait([*watch, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in self._tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    log.critical("%s died; stopping", task.get_name(), exc_info=task.exception())
            for task in watch:
                task.cancel()
