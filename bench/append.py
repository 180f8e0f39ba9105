"""Events appended per second by one process, through EventLog.append (no fence).

(a) one event per transaction, (b) 100 events per transaction; each over a fixed duration,
the median of three runs. Every coroutine owns its tasks (no version conflicts) and passes
each append the view the previous append returned.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Callable, Sequence

import uvloop
from benchlib import BUDGET_S, StepTask, describe_postgres, running_tasks, scratch_database

from events import db
from events.log import EventLog
from events.model import NewEvent

TASKS = 1024
CONCURRENCY = 16
POOL = 16
DURATION_S = 5.0
RUNS = 3
BATCH = 100

Make = Callable[[StepTask], Sequence[NewEvent]]


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


async def scenario(log: EventLog, tasks: list[StepTask], title: str, make: Make) -> None:
    rates = [await measure(log, tasks, make) for _ in range(RUNS)]
    print(f"{title}: median {statistics.median(rates):,.0f} events/s"
          f"  (runs: {', '.join(f'{r:,.0f}' for r in rates)})", flush=True)


async def main() -> None:
    async with asyncio.timeout(BUDGET_S), scratch_database("append") as url:
        pool = await db.create_pool(url, min_size=POOL, max_size=POOL)
        try:
            log = EventLog(pool)
            tasks = await running_tasks(log, TASKS)
            print(f"append: {await describe_postgres(url)}; {TASKS} running tasks, "
                  f"{CONCURRENCY} coroutines, pool {POOL}, {RUNS} runs x {DURATION_S:g} s each, no fence")
            await scenario(log, tasks, "(a) 1 event per append  ", lambda t: [t.next_event()])
            await scenario(log, tasks, f"(b) {BATCH} events per append", lambda t: t.batch(BATCH))
        finally:
            await pool.close()


if __name__ == "__main__":
    uvloop.run(main())
