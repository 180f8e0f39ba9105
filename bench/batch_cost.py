"""PostgreSQL's CPU per group-commit batch, by batch size: what one backend spends (user +
system time, by psutil) per call of `taskcast_append_batch` carrying N
one-event appends to N running tasks, and per item; beside the raw peer on another
connection of the same database, N rows of the shape of `events` in one transaction
(`executemany`, one INSERT per transaction at N = 1). Sequential calls on one connection
each, interleaved, the median of ROUNDS; the views' JSON is printed too (PostgreSQL parses
every view an append sends into jsonb).

This is where a batch's fixed cost and its cost per item show apart, which rates cannot
separate. To see inside one size: `python bench/batch_cost.py --size 16 --seconds 20`
prints the backend's pid first; `perf record -g -p PID -- sleep 10` while it runs, then
`perf report --children`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import asyncpg
import orjson
import psutil
import uvloop
from append import INSERT, RAW_TABLE, RawWriter
from benchlib import BUDGET_S, StepTask, describe_postgres, running_tasks, scratch_database

from events import db
from events.commit import append_batch, prepare
from events.log import EventLog

SIZES = (1, 4, 16, 64)
ROUNDS = 3
ITEMS_PER_ROUND = 1600  # per size and side: calls = ITEMS_PER_ROUND / size (at least 100)
TASKS = 64


def backend_cpu_s(backend: psutil.Process) -> float:
    """User + system seconds of a process so far."""
    times = backend.cpu_times()
    return float(times.user + times.system)


class Side:
    """A connection's backend, and a call of `size` items on that connection."""

    def __init__(self, pid: int, call: Callable[[int], Awaitable[None]]) -> None:
        self.pid, self.backend, self.call = pid, psutil.Process(pid), call

    async def measure(self, size: int, calls: int) -> tuple[float, float]:
        """Backend CPU per call and wall time per call, in seconds."""
        cpu, started = backend_cpu_s(self.backend), time.perf_counter()
        for _ in range(calls):
            await self.call(size)
        return (backend_cpu_s(self.backend) - cpu) / calls, (time.perf_counter() - started) / calls


def taskcast_call(conn: asyncpg.Connection, tasks: list[StepTask]) -> Callable[[int], Awaitable[None]]:
    async def call(size: int) -> None:
        now = datetime.now(UTC)
        items = [prepare(t.id, t.view, [t.next_event()], now) for t in tasks[:size]]
        results = await append_batch(conn, items)
        for task, item, result in zip(tasks[:size], items, results, strict=True):
            if not isinstance(result, list):
                raise RuntimeError(f"append to {task.id} failed: {result}")
            task.view = item.new
            task.appended += 1
    return call


def raw_call(conn: asyncpg.Connection, writer: RawWriter) -> Callable[[int], Awaitable[None]]:
    async def call(size: int) -> None:
        rows = writer.rows(0, size)
        if size == 1:
            await conn.execute(INSERT, *rows[0])
        else:
            await conn.executemany(INSERT, rows)  # one transaction
    return call


async def main(sizes: tuple[int, ...], seconds: float | None) -> None:
    async with asyncio.timeout(BUDGET_S), scratch_database("batch_cost") as url:
        pool = await db.create_pool(url, min_size=1, max_size=1)
        raw_pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
        assert raw_pool is not None
        try:
            await raw_pool.execute(RAW_TABLE)
            tasks = await running_tasks(EventLog(pool), TASKS)
            async with pool.acquire() as conn, raw_pool.acquire() as raw:
                ours = Side(await conn.fetchval("SELECT pg_backend_pid()"), taskcast_call(conn, tasks))
                peer = Side(await raw.fetchval("SELECT pg_backend_pid()"), raw_call(raw, RawWriter(raw_pool)))
                print(f"batch cost: {await describe_postgres(url)}; one connection a side, "
                      f"{ROUNDS} interleaved rounds of {ITEMS_PER_ROUND} items a size; "
                      f"taskcast's backend is pid {ours.pid}", flush=True)
                if seconds is not None:  # one size for a while, for perf
                    deadline = time.monotonic() + seconds
                    while time.monotonic() < deadline:
                        await ours.call(sizes[0])
                    return
                for size in sizes:
                    calls = max(100, ITEMS_PER_ROUND // size)
                    figures: dict[str, list[tuple[float, float]]] = {"taskcast": [], "raw": []}
                    for _ in range(ROUNDS):
                        figures["taskcast"].append(await ours.measure(size, calls))
                        figures["raw"].append(await peer.measure(size, calls))
                    view_bytes = statistics.mean(len(orjson.dumps(t.view)) for t in tasks[:size])
                    line = []
                    for side, runs in figures.items():
                        cpu = statistics.median(c for c, _ in runs)
                        wall = statistics.median(w for _, w in runs)
                        line.append(f"{side} {cpu * 1e6:6.0f} µs a call, {cpu / size * 1e6:5.1f} an item, "
                                    f"wall {wall * 1e3:5.2f} ms")
                    ratio = (statistics.median(c for c, _ in figures["taskcast"])
                             / statistics.median(c for c, _ in figures["raw"]))
                    print(f"  {size:3d} items: {'; '.join(line)}; CPU ratio {ratio:.2f} "
                          f"(views of {view_bytes:,.0f} bytes of JSON)", flush=True)
        finally:
            await raw_pool.close()
            await pool.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, help="only this batch size")
    parser.add_argument("--seconds", type=float, help="with --size: run it this long, untimed (for perf)")
    args = parser.parse_args()
    if args.seconds is not None and args.size is None:
        parser.error("--seconds needs --size")
    if args.size is not None and not 1 <= args.size <= TASKS:
        parser.error(f"--size must be 1 to {TASKS} (the running tasks a batch appends to)")
    uvloop.run(main((args.size,) if args.size else SIZES, args.seconds))
