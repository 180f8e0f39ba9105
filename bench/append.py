"""Events appended per second by one process, through EventLog.append (no fence), beside
the floor: raw asyncpg writing equivalent rows to a plain table of the same shape.

(a) one event per transaction, (b) 100 events per transaction; each over a fixed duration,
the median of three interleaved runs. Every coroutine owns its tasks (no version
conflicts) and passes each append the view the previous append returned.
The raw peer, in the same run: a table `raw_events` with the columns, primary key,
unique constraint and index of `events` (and no trigger), written by 16 coroutines each on
its own connection of an asyncpg pool: (a) one INSERT per transaction (autocommit), (b)
100 rows per transaction via `executemany` and via COPY (`copy_records_to_table`). The raw
peer writes only the event row; EventLog.append also reads and updates the task's row.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

import asyncpg
import orjson
import uvloop
from benchlib import BUDGET_S, StepTask, describe_postgres, events_shaped, running_tasks, scratch_database

from events import db
from events.log import EventLog
from events.model import NewEvent

TASKS = 1024
CONCURRENCY = 16
POOL = 16
DURATION_S = 3.0
RUNS = 3
BATCH = 100

Make = Callable[[StepTask], Sequence[NewEvent]]
# One coroutine's turn of the raw peer: (connection, its task ids, the turn number) -> rows written
RawTurn = Callable[[asyncpg.Connection, str, int], Awaitable[int]]

RAW_TABLE = events_shaped("raw_events")
INSERT = "INSERT INTO raw_events (task_id, version, scope, type, data, at) VALUES ($1, $2, $3, $4, $5, $6)"
COLUMNS = ("task_id", "version", "scope", "type", "data", "at")


async def measure(log: EventLog, tasks: list[StepTask], make: Make) -> float:
    """Events/s appended by CONCURRENCY coroutines during DURATION_S."""
    deadline = time.perf_counter() + DURATION_S

    async def worker(mine: list[StepTask]) -> int:
        appended, turns = 0, itertools.cycle(mine)
        while time.perf_counter() < deadline:
            task = next(turns)
            events = make(task)
            await task.append(log, events)
            appended += len(events)
        return appended

    started = time.perf_counter()
    counts = await asyncio.gather(*(worker(tasks[i::CONCURRENCY]) for i in range(CONCURRENCY)))
    return sum(counts) / (time.perf_counter() - started)


class RawWriter:
    """The raw peer: CONCURRENCY coroutines, one connection each, own task ids (a version
    counter per coroutine keeps (task_id, version) unique)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.versions = [0] * CONCURRENCY

    def rows(self, who: int, n: int) -> list[tuple[object, ...]]:
        first = self.versions[who]
        self.versions[who] += n
        at = datetime.now(UTC)
        return [(f"raw_{who}", v, "bench", "step.progress",
                 orjson.dumps({"step": f"step-{v // 10 % 8}", "progress": v % 10 / 10}).decode(), at)
                for v in range(first + 1, first + n + 1)]

    async def measure(self, mode: str) -> float:
        deadline = time.perf_counter() + DURATION_S

        async def worker(who: int) -> int:
            written = 0
            async with self.pool.acquire() as conn:
                while time.perf_counter() < deadline:
                    if mode == "insert":
                        await conn.execute(INSERT, *self.rows(who, 1)[0])
                        written += 1
                    elif mode == "executemany":
                        await conn.executemany(INSERT, self.rows(who, BATCH))  # one transaction
                        written += BATCH
                    else:
                        await conn.copy_records_to_table("raw_events", records=self.rows(who, BATCH),
                                                         columns=COLUMNS)
                        written += BATCH
            return written

        started = time.perf_counter()
        counts = await asyncio.gather(*(worker(i) for i in range(CONCURRENCY)))
        return sum(counts) / (time.perf_counter() - started)


def runs(rates: list[float]) -> str:
    return f"median {statistics.median(rates):,.0f} events/s (runs: {', '.join(f'{r:,.0f}' for r in rates)})"


async def main() -> None:
    async with asyncio.timeout(BUDGET_S), scratch_database("append") as url:
        pool = await db.create_pool(url, min_size=POOL, max_size=POOL)
        raw_pool = await asyncpg.create_pool(url, min_size=CONCURRENCY, max_size=CONCURRENCY)
        assert raw_pool is not None
        try:
            await raw_pool.execute(RAW_TABLE)
            log = EventLog(pool)
            raw = RawWriter(raw_pool)
            tasks = await running_tasks(log, TASKS)
            print(f"append: {await describe_postgres(url)}; {TASKS} running tasks, "
                  f"{CONCURRENCY} coroutines, pool {POOL}, {RUNS} interleaved runs x {DURATION_S:g} s each, "
                  f"no fence; raw asyncpg peer: {CONCURRENCY} connections, a plain table of the shape "
                  f"of `events`")
            one: dict[str, list[float]] = {"taskcast": [], "insert": []}
            many: dict[str, list[float]] = {"taskcast": [], "executemany": [], "copy": []}
            for _ in range(RUNS):
                one["taskcast"].append(await measure(log, tasks, lambda t: [t.next_event()]))
                one["insert"].append(await raw.measure("insert"))
            for _ in range(RUNS):
                many["taskcast"].append(await measure(log, tasks, lambda t: t.batch(BATCH)))
                many["executemany"].append(await raw.measure("executemany"))
                many["copy"].append(await raw.measure("copy"))
        finally:
            await raw_pool.close()
            await pool.close()
    med = {k: statistics.median(v) for k, v in {**one, **{f"b_{k}": v for k, v in many.items()}}.items()}
    print(f"(a) 1 event per append   taskcast: {runs(one['taskcast'])}")
    print(f"    raw asyncpg, 1 INSERT per transaction: {runs(one['insert'])}")
    print(f"    ratio of the medians, taskcast / raw {med['taskcast'] / med['insert']:.2f} (target >= 0.8)")
    print(f"(b) {BATCH} events per append taskcast: {runs(many['taskcast'])}")
    print(f"    raw asyncpg, executemany of {BATCH} rows: {runs(many['executemany'])}  "
          f"ratio {med['b_taskcast'] / med['b_executemany']:.2f}")
    print(f"    raw asyncpg, COPY of {BATCH} rows: {runs(many['copy'])}  "
          f"ratio {med['b_taskcast'] / med['b_copy']:.2f} (target >= 0.7)")


if __name__ == "__main__":
    uvloop.run(main())
