"""Shared by the benchmarks: the servers, a scratch database, tasks to append to, percentiles."""

from __future__ import annotations

import asyncio
import math
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from cli.embedded.cluster import start_cluster, stop_cluster
from events.fold import View
from events.ids import TaskId
from events.log import CreateTask, EventLog
from events.migrate import migrate
from events.model import EventType, NewEvent
from events.relay.batch import decode_batch
from events.relay.bus import Client, bus_for
from events.relay.waker import Waker

ADMIN_URL = os.environ.get("TASKCAST_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TASKCAST_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
BUDGET_S = 58.0  # every script stops (and cleans up) within this
STEP_NAMES = 8  # steps per task: views stay small however many events a task gets
CYCLE = 10  # step.started, 8 x step.progress, step.completed


def unique(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"


REDIS_CLUSTER = "a Redis Cluster (3 masters + 3 replicas, sharded pub/sub)"  # what redis_server starts


@contextmanager
def redis_server(cluster: bool) -> Iterator[str]:
    """REDIS_URL; with `cluster`, the URL of an embedded Redis Cluster (three masters with a
    replica each, cli/embedded/cluster.py) started for the script and stopped at its end."""
    if not cluster:
        yield REDIS_URL
        return
    with tempfile.TemporaryDirectory(prefix="taskcast-bench-cluster-") as root:
        started = start_cluster(Path(root))
        try:
            yield started.url
        finally:
            stop_cluster(started)


@asynccontextmanager
async def scratch_database(label: str) -> AsyncIterator[str]:
    """A fresh, migrated database `bench_<label>_<pid>_<random>`; dropped on exit. Its url."""
    name = unique(f"bench_{label}")
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            url = urlunsplit(urlsplit(ADMIN_URL)._replace(path="/" + name))
            await migrate(url)
            yield url
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def describe_postgres(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        version = await conn.fetchval("SHOW server_version")
        sync = await conn.fetchval("SHOW synchronous_commit")
        fsync = await conn.fetchval("SHOW fsync")
    finally:
        await conn.close()
    return f"PostgreSQL {version} (synchronous_commit={sync}, fsync={fsync})"


@dataclass
class StepTask:
    """A running task and its current view; appends legal step events to it forever."""

    id: TaskId
    view: View
    appended: int = 0

    def next_event(self) -> NewEvent:
        """The next event of the cycle step.started, 8 x step.progress, step.completed."""
        i = self.appended % CYCLE
        step = f"step-{self.appended // CYCLE % STEP_NAMES}"
        if i == 0:
            return NewEvent(EventType.STEP_STARTED, {"step": step})
        if i == CYCLE - 1:
            return NewEvent(EventType.STEP_COMPLETED, {"step": step})
        return NewEvent(EventType.STEP_PROGRESS, {"step": step, "progress": i / CYCLE})

    def batch(self, size: int) -> list[NewEvent]:
        """One step.started, then size - 1 step.progress of that step."""
        step = f"step-{self.appended // size % STEP_NAMES}"
        return [NewEvent(EventType.STEP_STARTED, {"step": step}),
                *(NewEvent(EventType.STEP_PROGRESS, {"step": step, "progress": k / size})
                  for k in range(1, size))]

    async def append(self, log: EventLog, events: Sequence[NewEvent]) -> None:
        self.view, _ = await log.append(self.id, self.view, events)
        self.appended += len(events)


async def running_tasks(log: EventLog, count: int, *, concurrency: int = 16) -> list[StepTask]:
    """`count` tasks of kind demo, scope bench, each created and then started."""
    spec = CreateTask(kind="demo", scope="bench")
    tasks: list[StepTask] = []

    async def make(n: int) -> None:
        for _ in range(n):
            ack = await log.create(spec)
            view, _ = await log.append(ack.task, await log.view(ack.task),
                                       [NewEvent(EventType.TASK_STARTED, {})])
            tasks.append(StepTask(ack.task, view))

    share, extra = divmod(count, concurrency)
    await asyncio.gather(*(make(share + (i < extra)) for i in range(concurrency)))
    return tasks


def events_shaped(table: str) -> str:
    """SQL for a plain table of the shape of `events` (columns, defaults, identity, indexes;
    none of its triggers): the raw peers' table, which follows the schema by construction."""
    return f"CREATE TABLE {table} (LIKE events INCLUDING DEFAULTS INCLUDING IDENTITY INCLUDING INDEXES)"


def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def latency_line(seconds: Sequence[float]) -> str:
    """p50/p90/p99/max (and min) in milliseconds."""
    ms = sorted(s * 1000 for s in seconds)
    return (f"p50 {percentile(ms, 50):.2f} ms  p90 {percentile(ms, 90):.2f} ms  "
            f"p99 {percentile(ms, 99):.2f} ms  max {ms[-1]:.2f} ms  min {ms[0]:.2f} ms  (n={len(ms)})")


async def tap(redis: Client, channel: str, seen: dict[tuple[str, int], float], *,
              clock: Callable[[], float] = time.monotonic) -> None:
    """Note when each event's relay message reaches a Redis subscriber (as the node's do, one
    per partition on a Redis Cluster), by (task, version), until cancelled; subscribe well
    before the events of interest are written."""
    bus = bus_for(redis, channel)

    async def note(message: bytes) -> None:
        now = clock()
        for u in decode_batch(message).updates:
            seen.setdefault((u.task, u.version), now)

    async with asyncio.TaskGroup() as group:
        for p in range(bus.partitions):
            group.create_task(bus.follow_partition(p, note))


def start_waker(redis: Client, channel: str) -> Waker:
    """A Waker whose loop runs until the benchmark's event loop ends: what a taskcast
    process gives its EventLog, so the relay hears of this process's appends at once."""
    waker = Waker(redis, channel)
    _wakers.append(asyncio.get_running_loop().create_task(waker.run()))
    return waker


_wakers: list[asyncio.Task[None]] = []


@asynccontextmanager
async def foreign_transaction(url: str, *, open_s: float = 30.0) -> AsyncIterator[None]:
    """What the application beside taskcast does: `BEGIN; INSERT ...` on `url`, left open for
    the block, then COMMIT. PostgreSQL ends it after `open_s` in any case."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS app_orders (id bigserial PRIMARY KEY, note text)")
        await conn.execute(f"SET idle_in_transaction_session_timeout = '{int(open_s * 1000)}ms'")
        await conn.execute("BEGIN")
        await conn.execute("INSERT INTO app_orders (note) VALUES ('a long batch job')")
        yield
        await conn.execute("COMMIT")
    finally:
        await conn.close(timeout=5)


@asynccontextmanager
async def app_database(label: str) -> AsyncIterator[str]:
    """Another, unmigrated database on the same server (the application's); dropped on exit."""
    name = unique(f"bench_{label}_app")
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield urlunsplit(urlsplit(ADMIN_URL)._replace(path="/" + name))
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
