"""Start latency: create -> `task.started` received by a websocket subscriber, at a paced
100 tasks/s, beside pgqueuer's enqueue -> job start at 100 jobs/s; interleaved runs.

taskcast: `taskcast serve`, `taskcast relay` and one `taskcast worker` (default
concurrency and lease) run as subprocesses on a scratch database; one raw subscriber of
channel `all` (wsterm.py, a child process) notes when each task's `task.started` update
arrives. This process creates demo tasks {"steps": 1, "step_ms": 0} through
EventLog.create, one every 10 ms (each create its own coroutine, so a slow one does not
delay the next) for 10 s; the latency is from create() returning to the update's arrival
(time.time() in both processes).

pgqueuer: its schema in another scratch database; one consumer process (pgq_consumer.py,
continuous, batch size 10) whose no-op job writes its id and time.time() as it starts;
this process enqueues one job every 10 ms for 10 s; the latency is from enqueue()
returning to the job's start.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from importlib.metadata import version
from pathlib import Path
from typing import Any

import asyncpg
import uvloop
from benchlib import REDIS_URL, app_database, describe_postgres, percentile, scratch_database, tap, unique
from pgqueuer import AsyncpgDriver, Queries
from subprocs import Background, Children, cancel_on_sigterm, die_with_parent, raise_nofile, stop_popen
from wsterm import WatcherProcess

from events import db
from events.log import CreateTask, EventLog
from events.relay.bus import connect

HERE = Path(__file__).resolve().parent
RATE = 100.0
DURATION_S = 10.0
RUNS = 3
WARMUP = 20
BUDGET_S = 88.0
CLEANUP_S = 12.0


async def paced(rate: float, duration_s: float, one: Callable[[], Coroutine[Any, Any, tuple[str, float]]]
                ) -> dict[str, float]:
    """Call `one` every 1/rate s for duration_s, each in its own task: {id: time returned}."""
    done: dict[str, float] = {}
    start = time.monotonic()
    pending: list[asyncio.Task[tuple[str, float]]] = []
    for i in range(int(rate * duration_s)):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        pending.append(asyncio.create_task(one()))
    for key, at in await asyncio.gather(*pending):
        done[key] = at
    return done


def figures(latencies: list[float]) -> tuple[float, float, float]:
    ms = sorted(x * 1000 for x in latencies)
    return percentile(ms, 50), percentile(ms, 99), ms[-1]


async def taskcast_run(log: EventLog, pool: asyncpg.Pool, watcher: WatcherProcess, count_s: float,
                       published: dict[tuple[str, int], float]) -> tuple[list[float], int, list[list[float]]]:
    """Latencies, how many were not received, and the parts of each latency: create()
    returned -> the `at` of task.started (the worker's clock as it appends), that `at` ->
    the subscriber (the worker's commit, the relay, the node), split where the relay's
    message reaches a Redis subscriber in this process (`published`: time.time() by task
    and version): the worker's commit, its hint and the relay's read and publish, then
    the node and the socket."""
    spec = CreateTask("demo", "start", {"steps": 1, "step_ms": 0})

    async def one() -> tuple[str, float]:
        ack = await log.create(spec)
        return ack.task, time.time()

    created = await paced(RATE, count_s, one)
    seen, stats = await watcher.wait("task.started", len(created), 15.0)
    arrived = seen["task.started"]
    missing = sum(1 for t in created if t not in arrived)
    stamps = dict(await pool.fetch("SELECT task_id, at FROM events WHERE type = 'task.started' "
                                   "AND task_id = ANY($1::text[])", list(created)))
    got = [t for t in created if t in arrived and t in stamps and (t, 2) in published]
    return ([arrived[t] - created[t] for t in got], missing + stats["resyncs"],
            [[stamps[t].timestamp() - created[t] for t in got],
             [arrived[t] - stamps[t].timestamp() for t in got],
             [published[t, 2] - stamps[t].timestamp() for t in got],
             [arrived[t] - published[t, 2] for t in got]])


async def pgq_run(queries: Queries, starts: Path, count_s: float) -> tuple[list[float], int]:
    async def one() -> tuple[str, float]:
        ids = await queries.enqueue("noop", None)
        return str(ids[0]), time.time()

    enqueued = await paced(RATE, count_s, one)
    deadline = time.monotonic() + 15
    begun: dict[str, float] = {}
    while time.monotonic() < deadline:
        begun = {}
        for line in starts.read_text().splitlines():
            job, _, at = line.partition(" ")
            if at:
                begun.setdefault(job, float(at))
        if all(j in begun for j in enqueued):
            break
        await asyncio.sleep(0.05)
    missing = sum(1 for j in enqueued if j not in begun)
    return [begun[j] - at for j, at in enqueued.items() if j in begun], missing


async def main(runs: int, duration_s: float) -> None:
    cancel_on_sigterm()
    raise_nofile()
    deadline = time.monotonic() + BUDGET_S - CLEANUP_S
    channel = unique("taskcast:bench:start")
    tc_runs: list[tuple[float, float, float]] = []
    part_runs: list[list[tuple[float, float, float]]] = [[], [], [], []]
    pq_runs: list[tuple[float, float, float]] = []
    missed = [0, 0]
    loads: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench_start_") as tmp:
        starts = Path(tmp) / "starts"
        starts.touch()
        async with asyncio.timeout(BUDGET_S), scratch_database("start") as url, \
                app_database("start_pgq") as pgq_url, Children(url, REDIS_URL, channel) as children:
            children.start("relay")
            node, port = await children.serve(ready=True)
            worker = children.start("worker", env={"TASKCAST_WORKSPACE_ROOT": tmp})
            describe = await describe_postgres(url)
            pool = await db.create_pool(url, min_size=4, max_size=16)
            pgq_conn = await asyncpg.connect(pgq_url)
            redis = connect(REDIS_URL)
            published: dict[tuple[str, int], float] = {}  # task.started is version 2
            tapping = asyncio.create_task(tap(redis, channel, published, clock=time.time))
            consumer: subprocess.Popen[bytes] | None = None
            try:
                queries = Queries(AsyncpgDriver(pgq_conn))
                await queries.install()
                consumer = subprocess.Popen([sys.executable, str(HERE / "pgq_consumer.py"), pgq_url,
                                             "--mode", "continuous", "--starts", str(starts)],
                                            stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
                log = EventLog(pool)
                async with WatcherProcess(port, ("task.started",)) as watcher:
                    # warm-up: every process has run a few before the timed runs
                    await taskcast_run(log, pool, watcher, WARMUP / RATE, published)
                    await pgq_run(queries, starts, WARMUP / RATE)
                    for _ in range(runs):
                        if time.monotonic() + 2 * (duration_s + 3) > deadline:
                            break
                        background = Background().start()
                        lat, miss, parts = await taskcast_run(log, pool, watcher, duration_s, published)
                        tc_runs.append(figures(lat))
                        for runs_of_part, part in zip(part_runs, parts, strict=True):
                            runs_of_part.append(figures(part))
                        missed[0] += miss
                        worker.check_alive()
                        node.check_alive()
                        lat, miss = await pgq_run(queries, starts, duration_s)
                        pq_runs.append(figures(lat))
                        missed[1] += miss
                        loads.append(background.stop())
            finally:
                if consumer is not None:
                    stop_popen(consumer)
                await pgq_conn.close()
                await pool.close()
                tapping.cancel()
                await asyncio.gather(tapping, return_exceptions=True)
                await redis.aclose()
    n = int(RATE * duration_s)
    print(f"start latency: {describe}; {RATE:.0f}/s for {duration_s:g} s ({n:,} per run), "
          f"{len(tc_runs)} interleaved runs, medians of the per-run figures")

    def line(rs: list[tuple[float, float, float]]) -> str:
        p50, p99 = statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)
        return (f"p50 {p50:.2f} ms  p99 {p99:.2f} ms  (runs p50/p99/max: "
                f"{', '.join(f'{a:.1f}/{b:.1f}/{c:.1f}' for a, b, c in rs)})")

    if not tc_runs:
        print("  out of time before a run")
        return
    print(f"  taskcast, create() returned -> task.started received by an `all` subscriber (serve + relay + "
          f"1 worker, default concurrency): {line(tc_runs)}; {missed[0]} not received")
    pickup, deliver, relay, node = part_runs
    print(f"    of which create() returned -> the worker's `at` of task.started: {line(pickup)}")
    print(f"    and that `at` -> received (the worker's commit, relay, node): {line(deliver)}")
    print(f"      `at` -> the relay's message in Redis (commit, hint, read, publish): {line(relay)}")
    print(f"      the relay's message in Redis -> received (node, socket): {line(node)}")
    print(f"  pgqueuer {version('pgqueuer')}, enqueue() returned -> job start (1 consumer, batch size 10): "
          f"{line(pq_runs)}; {missed[1]} not started")
    tc99, pq99 = statistics.median(r[1] for r in tc_runs), statistics.median(r[1] for r in pq_runs)
    print(f"  p99 ratio taskcast / pgqueuer {tc99 / pq99:.2f}")
    if len(tc_runs) < runs:
        print(f"  (fewer than {runs} runs: the next would have overrun the {BUDGET_S:.0f} s budget)")
    print(f"  {loads[len(loads) // 2]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--duration", type=float, default=DURATION_S, help="seconds per run and side")
    a = parser.parse_args()
    uvloop.run(main(a.runs, a.duration))
