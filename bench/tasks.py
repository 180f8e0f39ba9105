"""Workers: (a) create -> task.started latency with an idle worker, (b) tasks completed per
second by 2 worker processes.

(a) One `taskcast worker` subprocess (default concurrency and lease) waits, idle. This
process creates 200 `demo` tasks ({"steps": 1, "step_ms": 0}) one after the other through
EventLog.create, and after each waits until the task has completed (so the worker is idle
again) before the next. It LISTENs on `taskcast_events` and, on each notification (or
every 5 ms), looks the task's `task.started` up in the events table. Two figures: from
create() returning to this process seeing the committed `task.started` (includes the
notification and the query: an upper bound), and to the `at` of that event (the worker's
clock when it began appending it, before its commit: nearly a lower bound, but it can
precede create() returning here, as the worker is woken by the commit's notification).

(b) That worker is stopped; 5,000 demo tasks {"steps": 3, "step_ms": 0} are created first
(16 coroutines), then 2 `taskcast worker --concurrency 32` subprocesses start. The rate is
taken from the log, from the first `task.started` to the last `task.completed`; the count
of completed tasks is polled every 50 ms to know when to stop. CPU use of the workers and
of PostgreSQL (every server process) over the same stretch says which one limits it.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import psutil
import uvloop
from benchlib import REDIS_URL, latency_line, scratch_database, unique
from subprocs import (
    Background,
    Child,
    Children,
    CpuMeter,
    cancel_on_sigterm,
    postgres_processes,
    raise_nofile,
)

from events import db
from events.aio import wait_event
from events.log import CreateTask, EventLog
from events.relay.bus import Client, connect, wake_channel

IDLE_TASKS = 200
IDLE_WARMUP = 10
BULK_TASKS = 5000
BULK_WORKERS = 2
BULK_CONCURRENCY = 32
CREATORS = 16
POLL_S = 0.05
BUDGET_S = 85.0
CLEANUP_S = 12.0  # stopping the workers, dropping the database


async def idle_latency(log: EventLog, url: str, count: int, warmup: int, redis: Client,
                       channel: str) -> tuple[list[float], list[float]]:
    """(seconds from create() returning to seeing task.started, ... to its `at`) per task."""
    listener = await asyncpg.connect(url)
    reader = await asyncpg.connect(url)
    wake = asyncio.Event()
    # Creates NOTIFY taskcast_events; the worker's appends wake the relay through Redis.
    await listener.add_listener("taskcast_events", lambda *_: wake.set())
    hints = redis.pubsub(ignore_subscribe_messages=True)
    await hints.subscribe(wake_channel(channel))

    async def hinted() -> None:
        while True:
            if await hints.get_message(ignore_subscribe_messages=True, timeout=1.0):
                wake.set()

    hinting = asyncio.create_task(hinted())
    seen: list[float] = []
    stamped: list[float] = []
    try:
        for n in range(warmup + count):
            ack = await log.create(CreateTask("demo", "idle", {"steps": 1, "step_ms": 0}))
            acked, acked_wall = time.monotonic(), time.time()
            started: float | None = None
            started_at: datetime | None = None
            deadline = acked + 10
            while True:
                wake.clear()
                rows = await reader.fetch("SELECT type, at FROM events WHERE task_id = $1 "
                                          "AND type IN ('task.started', 'task.completed')", ack.task)
                types = {r["type"]: r["at"] for r in rows}
                if started is None and "task.started" in types:
                    started, started_at = time.monotonic(), types["task.started"]
                if "task.completed" in types:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"task {ack.task} did not complete within 10 s")
                await wait_event(wake, 0.005)
            if n >= warmup:
                assert started is not None and started_at is not None
                seen.append(started - acked)
                stamped.append(started_at.timestamp() - acked_wall)
    finally:
        hinting.cancel()
        await asyncio.gather(hinting, return_exceptions=True)
        await hints.aclose()  # type: ignore[no-untyped-call]
        await listener.close()
        await reader.close()
    return seen, stamped


@dataclass
class Bulk:
    created_s: float  # creating the tasks
    window_s: float  # first task.started -> last task.completed
    events: int  # appended by the workers
    per_task: float  # events of a completed task, task.created included
    completed: int
    other: int  # ended otherwise (failed, ...)
    workers_cpu: list[float]
    pg_cpu: float
    load: str
    active: float  # mean, per poll: statements running in the database
    on_notify: float  # of which waiting for the NOTIFY commit lock
    on_wal: float  # of which waiting for the WAL flush


async def bulk(log: EventLog, url: str, children: Children, count: int, deadline: float) -> Bulk:
    """Create `count` tasks, then run them on BULK_WORKERS workers until they are all done
    (or `deadline`, monotonic, comes: then the figures are of what completed so far)."""
    started = time.monotonic()
    spec = CreateTask("demo", "bulk", {"steps": 3, "step_ms": 0})

    async def creator(n: int) -> None:
        for _ in range(n):
            await log.create(spec)

    share, extra = divmod(count, CREATORS)
    await asyncio.gather(*(creator(share + (i < extra)) for i in range(CREATORS)))
    created_s = time.monotonic() - started
    workers: list[Child] = [children.start("worker", "--concurrency", str(BULK_CONCURRENCY))
                            for _ in range(BULK_WORKERS)]  # TASKCAST_WORKSPACE_ROOT: in children.env
    watcher = await asyncpg.connect(url)
    meter = CpuMeter(find=lambda: [w.ps for w in workers] + postgres_processes())
    background = Background()
    metering = False
    waits: list[tuple[int, int, int]] = []  # per poll: active backends, on the NOTIFY lock, on WAL
    try:
        while True:
            row = await watcher.fetchrow(
                "SELECT count(*) FILTER (WHERE status = 'completed') AS done, "
                "count(*) FILTER (WHERE status NOT IN ('queued', 'completed', 'running')) AS other, "
                "count(*) FILTER (WHERE status <> 'queued') AS begun FROM tasks WHERE scope = 'bulk'")
            assert row is not None
            if row["begun"] and not metering:
                meter.start()
                background.start()
                metering = True
            if row["done"] + row["other"] >= count:
                break
            if metering:
                w = await watcher.fetchrow(
                    "SELECT count(*) AS active, "
                    "count(*) FILTER (WHERE wait_event_type = 'Lock' AND wait_event = 'object') AS notify, "
                    "count(*) FILTER (WHERE wait_event IN ('WALSync', 'WALWrite')) AS wal "
                    "FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' "
                    "AND pid <> pg_backend_pid()")
                assert w is not None
                waits.append((w["active"], w["notify"], w["wal"]))
            for w in workers:
                w.check_alive()
            if time.monotonic() > deadline:
                break  # out of time: report what completed
            await asyncio.sleep(POLL_S)
        meter.stop()
        load = background.stop()
        stats = await watcher.fetchrow(
            "SELECT min(at) FILTER (WHERE type = 'task.started') AS first, "
            "max(at) FILTER (WHERE type = 'task.completed') AS last, "
            "count(*) FILTER (WHERE type NOT IN ('task.created', 'task.queued')) AS events, "
            "count(*) FILTER (WHERE type = 'task.completed') AS completed "
            "FROM events WHERE scope = 'bulk' AND at <= (SELECT max(at) FROM events "
            "WHERE scope = 'bulk' AND type = 'task.completed')")
        assert stats is not None
        if stats["last"] is None:
            raise RuntimeError("no task completed in time")
        per_task = await watcher.fetchval(
            "SELECT count(*)::float / greatest(1, count(DISTINCT task_id)) FROM events "
            "WHERE task_id IN (SELECT id FROM tasks WHERE scope = 'bulk' AND status = 'completed')")
    finally:
        await watcher.close()
    worker_pids = [w.pid for w in workers]
    pg = [p for p in meter.used if p not in worker_pids]
    return Bulk(created_s, (stats["last"] - stats["first"]).total_seconds(), stats["events"],
                per_task, stats["completed"], row["other"],
                [meter.percent([p]) for p in worker_pids], meter.percent(pg), load,
                *(sum(w[i] for w in waits) / max(1, len(waits)) for i in range(3)))


async def main(idle_tasks: int, bulk_tasks: int) -> None:
    cancel_on_sigterm()
    raise_nofile()
    deadline = time.monotonic() + BUDGET_S - CLEANUP_S
    channel = unique("taskcast:bench:tasks")
    with tempfile.TemporaryDirectory(prefix="bench_tasks_ws_") as workspace:
        await run(idle_tasks, bulk_tasks, deadline, channel, workspace)


async def run(idle_tasks: int, bulk_tasks: int, deadline: float, channel: str, workspace: str) -> None:
    async with asyncio.timeout(BUDGET_S), scratch_database("tasks") as url, \
            Children(url, REDIS_URL, channel) as children, connect(REDIS_URL) as redis:
        # A worker refuses to start without a workspace root (the built-in kinds' directories).
        children.env["TASKCAST_WORKSPACE_ROOT"] = workspace
        pool = await db.create_pool(url, min_size=2, max_size=CREATORS)
        try:
            log = EventLog(pool)
            idle = children.start("worker")
            seen, stamped = await idle_latency(log, url, idle_tasks, IDLE_WARMUP, redis, channel)
            await idle.stop()
            b = await bulk(log, url, children, bulk_tasks, deadline)
        finally:
            await pool.close()
    print(f"(a) create -> task.started with one idle `taskcast worker` (concurrency 8, lease 30 s), "
          f"{idle_tasks} demo tasks {{steps 1, step_ms 0}} one after the other, after {IDLE_WARMUP} warm-up; "
          f"uvloop")
    print(f"  create() returned -> task.started seen committed here (LISTEN + query): "
          f"{latency_line(seen)}")
    print(f"  create() returned -> the worker's `at` of task.started (its clock before it appends; can "
          f"precede create() returning here): {latency_line(stamped)}")
    window = b.window_s
    print(f"(b) {bulk_tasks:,} demo tasks {{steps 3, step_ms 0}} created first "
          f"({bulk_tasks / b.created_s:,.0f} creates/s from {CREATORS} coroutines), then run by "
          f"{BULK_WORKERS} `taskcast worker --concurrency {BULK_CONCURRENCY}` subprocesses")
    print(f"  {b.completed / window:,.0f} tasks/s completed, {b.events / window:,.0f} events/s "
          f"(first task.started -> last task.completed {window:.2f} s; {b.per_task:.1f} "
          f"events per task, task.created included; {b.other} ended otherwise)")
    if b.completed < bulk_tasks:
        print(f"  OUT OF TIME: {b.completed:,} of {bulk_tasks:,} completed; the rates are of those")
    cpus = ", ".join(f"{c:.0f}%" for c in b.workers_cpu)
    print(f"  CPU over that stretch (% of one core, {psutil.cpu_count()} cores): workers {cpus}; "
          f"PostgreSQL (all server processes) {b.pg_cpu:.0f}%")
    print(f"  statements running in the database, mean of the {POLL_S * 1000:.0f} ms polls: "
          f"{b.active:.1f}, of which {b.on_notify:.1f} waiting for PostgreSQL's NOTIFY commit lock "
          f"(Lock:object; one for the whole cluster, held through each NOTIFYing commit's WAL flush) "
          f"and {b.on_wal:.1f} for the WAL")
    print(f"  {b.load}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle-tasks", type=int, default=IDLE_TASKS)
    parser.add_argument("--bulk-tasks", type=int, default=BULK_TASKS)
    args = parser.parse_args()
    uvloop.run(main(args.idle_tasks, args.bulk_tasks))
