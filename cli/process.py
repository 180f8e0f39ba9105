"""One taskcast process: builds the shared parts once and runs the chosen roles.

Roles: `serve` (a gateway node), `relay`, `workers`. `taskcast dev` runs all three.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from cli.metrics_endpoint import MetricsEndpoint, Render
from events import db
from events.aio import stop_tasks, where
from events.kind import KindSpec, as_kind
from events.kinds import builtin
from events.log import EventLog
from events.metrics import WorkerMetrics
from events.relay.bus import connect
from events.relay.publisher import Relay
from events.relay.waker import Waker
from events.worker import Worker
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
        log.warning("task %s:\n  %s", task.get_name(), where(task).replace(" > ", "\n  "))


@dataclass
class Roles:
    serve: bool = False
    relay: bool = False
    workers: int = 0


class Process:
    """The parts of one process. Use `async with Process(...)`, or `run()` until a signal.

    Started in order: the pool, Redis, the waker, the relay, the workers, their metrics
    endpoints (`relay_metrics_port`, `worker_metrics_port`: the workers of a process share
    one), and last the node (so nothing is accepted before the rest runs). Each part is
    registered on an exit stack as soon as it has started, so a start that fails at any
    point (a port in use, say) releases exactly what was started, in reverse order, and raises.
    """

    def __init__(self, settings: Settings, roles: Roles) -> None:
        self.settings = settings
        self.roles = roles
        self.node: Node | None = None
        self.relay: Relay | None = None
        self.workers: list[Worker] = []
        self.worker_metrics: WorkerMetrics | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stack: AsyncExitStack | None = None

    async def __aenter__(self) -> Process:
        s = self.settings
        kinds = load_kinds(s.kinds, s.shell_allow, s.clone_roots)
        self._stack = stack = AsyncExitStack()
        try:
            self.pool = await db.create_pool(s.database_url, min_size=1, max_size=20)
            stack.push_async_callback(self._close_pool)
            self.redis = connect(s.redis_url)
            stack.push_async_callback(self._close_redis)
            self.waker = Waker(self.redis, s.channel)
            self._start(self.waker.run(), "waker")
            self.log = EventLog(self.pool, on_append=self.waker.poke)
            if self.roles.relay:
                self.relay = Relay(s.database_url, self.log, self.redis, s.relay_config())
                self._start(self.relay.run(), "relay")
            if self.roles.workers:
                self.worker_metrics = WorkerMetrics(self.pool)
            for i in range(self.roles.workers):
                worker = Worker(s.database_url, self.log, kinds, s.worker_config(),
                                metrics=self.worker_metrics)
                self.workers.append(worker)
                self._start(worker.run(), f"worker-{i}")
            # Last in, first out: at stop the workers drain before their loops are cancelled.
            stack.push_async_callback(self._stop_loops)
            stack.push_async_callback(self._drain_workers)
            if self.relay is not None:
                await self._serve_metrics(stack, self.relay.metrics.render, s.relay_metrics_port)
            if self.worker_metrics is not None:
                await self._serve_metrics(stack, self.worker_metrics.render, s.worker_metrics_port)
            if self.roles.serve:
                node = Node(s, self.log, self.redis, kinds)
                stack.push_async_callback(node.stop)
                await node.start()
                self.node = node
                self.settings = node.settings
        except BaseException:
            await self._unwind()
            raise
        return self

    async def _serve_metrics(self, stack: AsyncExitStack, render: Render, port: int) -> None:
        if port:
            endpoint = MetricsEndpoint(render, self.settings.host, port)
            await endpoint.start()
            stack.push_async_callback(endpoint.stop, self.settings.stop_timeout_s)

    def _start(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop, in order, each stage time-boxed: the node (no new sockets, every socket
        closed with 1001, request tasks cancelled); the metrics endpoints; the workers
        drain (no new claims, `drain_grace_s` for running tasks, the rest handed back to be
        resumed elsewhere at once); the loops (relay, workers, waker) cancelled and awaited
        (an error one ended with is logged, one still running is logged with where it
        waits); Redis closed; the pool closed (terminated if a connection is not returned in
        time). Idempotent; the whole stop takes at most about five times `stop_timeout_s`
        plus the drain grace."""
        await self._unwind()
        self.node = None

    async def _unwind(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def _drain_workers(self) -> None:
        if not self.workers:
            return
        grace = self.settings.drain_grace_s
        try:
            async with asyncio.timeout(grace + 2 * self.settings.stop_timeout_s + 1):
                await asyncio.gather(*(w.drain(grace) for w in self.workers))
        except TimeoutError:
            log.warning("the workers did not drain in time")

    async def _stop_loops(self) -> None:
        tasks, self._tasks = self._tasks, []
        if tasks:
            await stop_tasks(tasks, self.settings.stop_timeout_s, log)

    async def _close_redis(self) -> None:
        try:
            async with asyncio.timeout(self.settings.stop_timeout_s):
                await self.redis.aclose()
        except (TimeoutError, OSError, RedisError) as exc:
            log.warning("closing Redis: %s", exc)

    async def _close_pool(self) -> None:
        try:
            async with asyncio.timeout(self.settings.stop_timeout_s):
                await self.pool.close()
        except TimeoutError:
            log.warning("a PostgreSQL connection was not returned in time; terminating the pool")
            self.pool.terminate()

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
            await asyncio.gather(*watch, return_exceptions=True)
