"""Which read bound: writers announcing themselves, or logical decoding? Measured side by side.

Issue 11 asks for a commit-order read that no foreign transaction can stall, by one of two
ways. This measures both on one PostgreSQL, in one run, with the same load: 4 writers
append single events through `EventLog.append` at a paced 400 events/s for PHASE_S seconds,
once quiet and once while a foreign write transaction (`BEGIN; INSERT`, same database) stays
open for the whole phase; one tailer reads as fast as it can (1 ms between empty reads):
- announce: `EventLog.read_after` (taskcast_writers(), then the read below the bound);
- logical: `pg_logical_slot_get_changes` on a test_decoding slot (the SQL interface: asyncpg
  does not speak the replication protocol), keeping the events' inserts.
For each it prints append-return -> seen by the tailer p50/p99, and the time one tailer call
takes (p50/p99): what the relay would pay per wake-up.

Logical decoding needs wal_level=logical, a server restart away on most servers. The script
first asks the server named by TASKCAST_BENCH_DATABASE_URL (and prints its wal_level), then
runs everything on an embedded PostgreSQL (the wheel's, PG 18) started with
wal_level=logical in a temporary directory, stopped at the end.
`.venv/bin/python bench/read_bound.py`
"""

from __future__ import annotations

import asyncio
import re
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import asyncpg
import uvloop
from benchlib import ADMIN_URL, StepTask, foreign_transaction, percentile, running_tasks
from subprocs import cancel_on_sigterm

from cli.embedded import restart_postgres, start_postgres, stop_postgres
from events import db
from events.ids import Position
from events.log import EventLog
from events.migrate import migrate

RATE = 400
WRITERS = 4
PHASE_S = 8.0
BUDGET_S = 120.0
_SEQ = re.compile(r"seq\[bigint\]:(\d+)")


def ms_line(seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    if not ms:
        return "n=0"
    return (f"p50 {percentile(ms, 50):.2f} ms  p99 {percentile(ms, 99):.2f} ms  max {ms[-1]:.2f} ms  "
            f"(n={len(ms)})")


async def paced_appends(log: EventLog, tasks: list[StepTask], duration: float,
                        returned: dict[int, float]) -> None:
    """WRITERS coroutines appending at RATE in all; the seq of each event -> when append returned."""
    per = RATE / WRITERS
    start = time.monotonic() + 0.05

    async def writer(mine: list[StepTask]) -> None:
        i = 0
        while (due := start + i / per) < start + duration:
            if (delay := due - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            task = mine[i % len(mine)]
            task.view, stored = await log.append(task.id, task.view, [task.next_event()])
            task.appended += 1
            returned[stored[0].position & ((1 << 64) - 1)] = time.monotonic()
            i += 1

    await asyncio.gather(*(writer(tasks[w::WRITERS]) for w in range(WRITERS)))


async def tail(step: Callable[[], Awaitable[list[int]]], seen: dict[int, float], calls: list[float],
               stop: asyncio.Event) -> None:
    """Call `step` (returns the seqs it read) until `stop`, 1 ms apart when it read nothing."""
    while not stop.is_set():
        t0 = time.monotonic()
        seqs = await step()
        now = time.monotonic()
        calls.append(now - t0)
        for seq in seqs:
            seen.setdefault(seq, now)
        if not seqs:
            await asyncio.sleep(0.001)


async def phase(name: str, url: str, log: EventLog, tasks: list[StepTask], foreign: bool,
                step: Callable[[], Awaitable[list[int]]]) -> None:
    returned: dict[int, float] = {}
    seen: dict[int, float] = {}
    calls: list[float] = []
    stop = asyncio.Event()
    tailer = asyncio.create_task(tail(step, seen, calls, stop))
    async with AsyncExitStack() as stack:
        if foreign:
            await stack.enter_async_context(foreign_transaction(url))
        await paced_appends(log, tasks, PHASE_S, returned)
        async with asyncio.timeout(20):
            while not set(returned) <= set(seen):  # noqa: ASYNC110 - with a deadline
                await asyncio.sleep(0.01)
        open_until = time.monotonic()
    stop.set()
    await tailer
    late = sum(seen[s] > open_until for s in returned)
    print(f"  {name}{' (foreign transaction open)' if foreign else ''}: append return -> tailer "
          f"{ms_line([seen[s] - t for s, t in returned.items()])}; one tailer call "
          f"{ms_line(calls)}; seen only after the foreign COMMIT: {late}")


async def announce_bound(url: str, log: EventLog, tasks: list[StepTask]) -> None:
    cursor: list[Position] = [await log.head()]

    async def step() -> list[int]:
        events = await log.read_after(cursor[0], limit=1000)
        if events:
            cursor[0] = events[-1].position
        return [e.position & ((1 << 64) - 1) for e in events]

    for foreign in (False, True):
        await phase("announce", url, log, tasks, foreign, step)


async def logical(url: str, log: EventLog, tasks: list[StepTask]) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SELECT pg_create_logical_replication_slot('taskcast_bench', 'test_decoding')")

        async def step() -> list[int]:
            rows = await conn.fetch(
                "SELECT data FROM pg_logical_slot_get_changes('taskcast_bench', NULL, NULL,"
                " 'skip-empty-xacts', '1', 'include-xids', '0')")
            return [int(m.group(1)) for r in rows if r["data"].startswith("table public.events: INSERT")
                    and (m := _SEQ.search(r["data"]))]

        for foreign in (False, True):
            await phase("logical", url, log, tasks, foreign, step)
    finally:
        await conn.execute("SELECT pg_drop_replication_slot('taskcast_bench')")
        await conn.close()


async def external_wal_level() -> str:
    try:
        conn = await asyncpg.connect(ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        return f"unreachable ({exc})"
    try:
        level = await conn.fetchval("SHOW wal_level")
        version = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    return f"PostgreSQL {version}, wal_level={level}" + (
        "" if level == "logical" else ": logical decoding impossible there without a restart")


async def main() -> None:
    cancel_on_sigterm()
    print(f"the benchmark server: {await external_wal_level()}")
    with tempfile.TemporaryDirectory(prefix="taskcast-bound-") as root:
        pg = await asyncio.to_thread(start_postgres, Path(root) / "pg")
        try:
            admin = await asyncpg.connect(pg.url)
            try:
                await admin.execute("ALTER SYSTEM SET wal_level = logical")
            finally:
                await admin.close()
            pg = await asyncio.to_thread(restart_postgres, pg)
            await migrate(pg.url)
            async with asyncio.timeout(BUDGET_S):
                await run(pg.url)
        finally:
            await asyncio.to_thread(stop_postgres, pg)


async def run(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        print(f"measured on: PostgreSQL {await conn.fetchval('SHOW server_version')}, wal_level="
              f"{await conn.fetchval('SHOW wal_level')}; {WRITERS} writers, {RATE} events/s, "
              f"{PHASE_S:.0f} s per phase")
    finally:
        await conn.close()
    pool = await db.create_pool(url, min_size=WRITERS + 1, max_size=WRITERS + 2)
    try:
        log = EventLog(pool)
        tasks = await running_tasks(log, 32)
        await announce_bound(url, log, tasks)
        await logical(url, log, tasks)
    finally:
        await pool.close()



if __name__ == "__main__":
    uvloop.run(main())
