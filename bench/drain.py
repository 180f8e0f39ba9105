"""Drain throughput: N queued `demo` tasks run by 1 and 2 `taskcast worker` processes,
beside N no-op jobs drained by 1 and 2 pgqueuer consumer processes, in interleaved runs.

taskcast: `taskcast serve` + `taskcast relay` run as subprocesses on a scratch database,
with one raw websocket subscriber of channel `all` (wsterm.py, a child process). Per run,
N demo tasks {"steps": 1, "step_ms": 0} are created first (EventLog.create from 32
coroutines, on connections with synchronous_commit off; not timed), then W `taskcast
worker` processes start; the time runs from starting them to the `at` of the last
`task.completed` (the worker's clock as it appends it). The run ends when the subscriber
has received the terminal update of every task (or at the run's share of the budget:
then it is marked CAPPED, its rate is of what completed, and the rest of its jobs are
deleted); then the workers are stopped, the rows of `events` are counted per type against
what N one-step demo tasks append, and the relay's lag is the subscriber's arrival of the
last task.completed minus that event's `at` (so it includes the worker's commit).

pgqueuer: its schema installed in another scratch database (`Queries.install`); per run,
N jobs of a no-op entrypoint are enqueued (batches of 1,000; not timed), then W consumer
processes (pgq_consumer.py, `QueueExecutionMode.drain`, batch size 10, each one asyncpg
connection) start; the time runs from starting them to the last `successful` row of
`pgqueuer_log`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import asyncpg
import psutil
import uvloop
from benchlib import REDIS_URL, app_database, describe_postgres, scratch_database, unique
from pgqueuer import AsyncpgDriver, Queries
from subprocs import (
    Background,
    Child,
    Children,
    CpuMeter,
    cancel_on_sigterm,
    die_with_parent,
    postgres_processes,
    raise_nofile,
    stop_popen,
)
from wsterm import WatcherProcess

from events import db
from events.log import CreateTask, EventLog

HERE = Path(__file__).resolve().parent
TASKS = 20_000
WORKERS = (1, 2)
RUNS = 3
CREATORS = 32
PGQ_BATCH = 10
BUDGET_S = 480.0  # room for 3 runs of each on a slow day (2,000 tasks/s)
CLEANUP_S = 15.0
TERMINAL = ("task.completed", "task.failed", "task.cancelled", "task.timed_out")
# What one demo task {"steps": 1, "step_ms": 0} appends, task.created included.
PER_TASK = {"task.created": 1, "task.started": 1, "step.started": 1, "step.progress": 1,
            "step.completed": 1, "task.completed": 1}


@dataclass
class Round:
    rate: float  # tasks (jobs) per second, from starting the processes to the last completion
    window_rate: float  # from the first start to the last completion, in the database's log
    cpu: dict[str, float]  # % of one core over the round
    cpu_us: dict[str, float]  # CPU µs per task (job) completed, the same processes
    load: str
    waits: str
    note: str = ""  # what the checks found
    lag_s: float | None = None
    create_s: float = 0.0  # creating the backlog (not timed)


class WaitSampler:
    """Every 100 ms, the statements running in `conn`'s database and how many of them wait
    for the WAL (WALWrite/WALSync: the commit's flush); means over the run."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.samples: list[tuple[int, int]] = []
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            row = await self.conn.fetchrow(
                "SELECT count(*) AS active, count(*) FILTER (WHERE wait_event IN ('WALSync', 'WALWrite')) "
                "AS wal FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' "
                "AND pid <> pg_backend_pid()")
            assert row is not None
            self.samples.append((row["active"], row["wal"]))
            await asyncio.sleep(0.1)

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> str:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        n = max(1, len(self.samples))
        active, wal = (sum(s[i] for s in self.samples) / n for i in range(2))
        return (f"statements running in its database {active:.1f} (mean of 100 ms polls), "
                f"{wal:.1f} waiting for the WAL")


def cpu_figures(meter: CpuMeter, groups: dict[str, list[int]],
                tasks: int) -> tuple[dict[str, float], dict[str, float]]:
    """Each group's CPU in % of one core over the round, and in µs per task completed."""
    return ({name: meter.percent(pids) for name, pids in groups.items()},
            {name: 1e6 * meter.seconds(pids) / max(1, tasks) for name, pids in groups.items()})


def ps(pid: int) -> psutil.Process:
    return psutil.Process(pid)


async def create_tasks(log: EventLog, scope: str, count: int) -> float:
    spec = CreateTask("demo", scope, {"steps": 1, "step_ms": 0})
    started = time.monotonic()

    async def creator(n: int) -> None:
        for _ in range(n):
            await log.create(spec)

    share, extra = divmod(count, CREATORS)
    await asyncio.gather(*(creator(share + (i < extra)) for i in range(CREATORS)))
    return count / (time.monotonic() - started)


async def taskcast_round(log: EventLog, conn: asyncpg.Connection, children: Children, watcher: WatcherProcess,
                         node_pid: int, relay_pid: int, scope: str, count: int, workers: int,
                         concurrency: int | None, workspace: str, cap_s: float) -> Round:
    """One run; `cap_s` after starting the workers it stops them and reports what completed."""
    created = time.monotonic()
    creates = await create_tasks(log, scope, count)
    await conn.execute("VACUUM ANALYZE jobs, tasks")
    create_s = time.monotonic() - created
    args = ["--concurrency", str(concurrency)] if concurrency else []
    env = {"TASKCAST_WORKSPACE_ROOT": workspace}
    started: list[Child] = []
    meter = CpuMeter(find=lambda: [*(c.ps for c in started), ps(node_pid), ps(relay_pid),
                                   *postgres_processes()])
    background = Background().start()
    meter.start()
    sampler = WaitSampler(conn)
    t0 = time.time()
    started.extend(children.start("worker", *args, env=env) for _ in range(workers))
    sampler.start()
    try:
        seen, stats = await watcher.wait("task.completed", count, cap_s)
        meter.stop()
        load = background.stop()
        waits = await sampler.stop()
        for w in started:
            w.check_alive()
    finally:
        await asyncio.gather(*(w.stop() for w in started))
        for w in started:
            children.started.remove(w)
    row = await conn.fetchrow(
        "SELECT min(at) FILTER (WHERE type = 'task.started') AS first, "
        "max(at) FILTER (WHERE type = 'task.completed') AS last FROM events WHERE scope = $1", scope)
    assert row is not None
    if row["last"] is None:
        raise RuntimeError(f"no task completed in time ({stats})")
    counts = dict(await conn.fetch("SELECT type, count(*) FROM events WHERE scope = $1 GROUP BY type", scope))
    done = counts.get("task.completed", 0)
    expected = {t: n * count for t, n in PER_TASK.items()}
    # Only this run's tasks: a capped run's last completions can arrive during the next run.
    ours = {r["id"] for r in await conn.fetch("SELECT id FROM tasks WHERE scope = $1", scope)}
    seen = {t: {task: at for task, at in arrivals.items() if task in ours} for t, arrivals in seen.items()}
    terminal = {t: len(seen.get(t, {})) for t in TERMINAL}
    notes = [f"{creates:,.0f} creates/s beforehand"]
    end = row["last"].timestamp()
    rate = done / (end - t0)
    metered = done  # the tasks completed while the CPU meter ran
    if done < count:
        # Out of time: the rate is of those completed by the cap (the workers finish what they
        # hold as they stop); the rest must not run later.
        by_cap = await conn.fetchval("SELECT count(*) FROM events WHERE scope = $1 AND "
                                     "type = 'task.completed' AND at <= $2",
                                     scope, datetime.fromtimestamp(t0 + cap_s, UTC))
        rate = by_cap / cap_s
        metered = by_cap
        notes.append(f"CAPPED at {cap_s:.0f} s: {by_cap:,} of {count:,} completed by then ({done:,} as the "
                     f"workers stopped; {terminal['task.completed']:,} task.completed updates received "
                     f"by the cap)")
        await conn.execute("DELETE FROM jobs WHERE scope = $1", scope)
        # The completions after the cap (the workers finish what they hold as they stop)
        # arrive now: take them here, so the next run's wait does not count them.
        late = done - terminal["task.completed"]
        if late > 0:
            await watcher.wait("task.completed", late, 10.0)
    else:
        if counts != expected:
            notes.append(f"EVENTS COMMITTED {counts} != expected {expected}")
        if terminal["task.completed"] != count or sum(terminal.values()) != count:
            notes.append(f"TERMINAL UPDATES RECEIVED {terminal} of {count} tasks")
    if stats["resyncs"] or stats["error"]:
        notes.append(f"subscriber: {stats['resyncs']} resyncs, error {stats['error']}")
    completed = seen.get("task.completed", {})
    lag = None
    if completed:
        last_task = max(completed, key=completed.__getitem__)  # the last one received
        at = await conn.fetchval("SELECT at FROM events WHERE task_id = $1 AND type = 'task.completed'",
                                 last_task)
        lag = completed[last_task] - at.timestamp()
    worker_pids = [w.pid for w in started]
    pg = [p for p in meter.used if p not in (*worker_pids, node_pid, relay_pid)]
    cpu, cpu_us = cpu_figures(meter, {"workers": worker_pids, "PostgreSQL": pg, "node": [node_pid],
                                      "relay": [relay_pid]}, metered)
    if len(notes) == 1:
        notes.append(f"ok: events per type as expected, {count:,} terminal updates received, "
                     f"{stats['updates']:,} updates")
    return Round(rate, done / (end - row["first"].timestamp()), cpu, cpu_us, load, waits,
                 "; ".join(notes), lag, create_s)


async def pgq_round(conn: asyncpg.Connection, url: str, count: int, workers: int, batch_size: int,
                    deadline: float) -> Round:
    queries = Queries(AsyncpgDriver(conn))
    for i in range(0, count, 1000):
        n = min(1000, count - i)
        await queries.enqueue(["noop"] * n, [None] * n, [0] * n)
    await conn.execute("VACUUM ANALYZE pgqueuer")
    procs: list[subprocess.Popen[bytes]] = []
    meter = CpuMeter(find=lambda: [*(ps(p.pid) for p in procs if p.poll() is None), *postgres_processes()])
    background = Background().start()
    meter.start()
    since = await conn.fetchval("SELECT now()")
    t0 = time.time()
    procs.extend([subprocess.Popen([sys.executable, str(HERE / "pgq_consumer.py"), url, "--mode", "drain",
                               "--batch-size", str(batch_size)], stdin=subprocess.DEVNULL,
                              preexec_fn=die_with_parent) for _ in range(workers)])
    pids = [p.pid for p in procs]
    sampler = WaitSampler(conn)
    sampler.start()
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            meter.stop()  # read while the consumers live: an exited process has no CPU times
            await asyncio.sleep(0.05)
        load = background.stop()
        waits = await sampler.stop()
    finally:
        for p in procs:
            stop_popen(p)
    row = await conn.fetchrow(
        "SELECT min(created) FILTER (WHERE status = 'picked') AS first, "
        "max(created) FILTER (WHERE status = 'successful') AS last, "
        "count(*) FILTER (WHERE status = 'successful') AS done FROM pgqueuer_log WHERE created >= $1", since)
    assert row is not None
    left = await conn.fetchval("SELECT count(*) FROM pgqueuer")
    notes = [] if row["done"] == count and left == 0 else [
        f"{row['done']} of {count} successful, {left} left"]
    if any(p.returncode for p in procs):
        notes.append(f"consumer exit codes {[p.returncode for p in procs]}")
    end = row["last"].timestamp()
    pg = [p for p in meter.used if p not in pids]
    cpu, cpu_us = cpu_figures(meter, {"consumers": pids, "PostgreSQL": pg}, row["done"])
    return Round(count / (end - t0), count / (end - row["first"].timestamp()), cpu, cpu_us, load, waits,
                 "; ".join(notes) or f"ok: {count:,} successful, queue empty")


def runs_line(rounds: list[Round]) -> str:
    return (f"{statistics.median(r.rate for r in rounds):,.0f}/s "
            f"(runs {', '.join(f'{r.rate:,.0f}' for r in rounds)})")


def median_round(rounds: list[Round]) -> Round:
    return sorted(rounds, key=lambda r: r.rate)[(len(rounds) - 1) // 2]


def cpu_line(r: Round) -> str:
    return ", ".join(f"{k} {v:.0f}%" for k, v in r.cpu.items())


def cpu_per_task(rounds: list[Round]) -> float:
    """The median over `rounds` of the CPU µs per task, all measured processes together."""
    return statistics.median(sum(r.cpu_us.values()) for r in rounds)


def cpu_us_line(r: Round) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in r.cpu_us.items())


async def main(count: int, worker_counts: list[int], runs: int, concurrency: int | None,
               batch_size: int) -> None:
    cancel_on_sigterm()
    raise_nofile()
    deadline = time.monotonic() + BUDGET_S - CLEANUP_S
    results: dict[int, tuple[list[Round], list[Round]]] = {w: ([], []) for w in worker_counts}
    short = False
    channel = unique("taskcast:bench:drain")
    with tempfile.TemporaryDirectory(prefix="bench_drain_ws_") as workspace:
        async with asyncio.timeout(BUDGET_S), scratch_database("drain") as url, \
                app_database("drain_pgq") as pgq_url, Children(url, REDIS_URL, channel) as children:
            relay = children.start("relay")
            node, port = await children.serve(ready=True)
            describe = await describe_postgres(url)
            # Creating the backlog is not timed: its commits need not wait for the WAL flush
            # (asyncpg passes unknown dsn parameters as server settings).
            pool = await db.create_pool(url + "?synchronous_commit=off", min_size=4, max_size=CREATORS)
            conn = await asyncpg.connect(url)
            pgq_conn = await asyncpg.connect(pgq_url)
            try:
                await Queries(AsyncpgDriver(pgq_conn)).install()
                log = EventLog(pool)
                async with WatcherProcess(port, TERMINAL) as watcher:
                    plan = [(r, w, side) for r in range(runs) for w in worker_counts
                            for side in ("taskcast", "pgqueuer")]
                    took: dict[tuple[str, int], float] = {}
                    create_s = count / 1000  # a first guess
                    for i, (r, w, side) in enumerate(plan):
                        # Keep room for what is left: a pgqueuer run as long as its last (10 s at
                        # first); each taskcast run an equal share of the rest, less its backlog's creation.
                        pq_need = {w2: max(10.0, 1.3 * took.get(("pgqueuer", w2), 0.0))
                                   for w2 in worker_counts}
                        left = plan[i:]
                        avail = deadline - time.monotonic()
                        tc_left = sum(1 for p in left if p[2] == "taskcast")
                        reserve = sum(pq_need[p[1]] for p in left if p[2] == "pgqueuer")
                        begun = time.monotonic()
                        if side == "taskcast":
                            # what creating the backlog took last time (not timed, but it takes time)
                            cap = (avail - reserve) / tc_left - 1.2 * create_s
                            if cap < 15:
                                short = True
                                continue
                            round_ = await taskcast_round(
                                log, conn, children, watcher, node.pid, relay.pid, f"drain{r}w{w}",
                                count, w, concurrency, workspace, cap)
                            create_s = round_.create_s
                        else:
                            if avail < pq_need[w]:
                                short = True
                                continue
                            round_ = await pgq_round(pgq_conn, pgq_url, count, w, batch_size,
                                                     begun + avail)
                        results[w][side == "pgqueuer"].append(round_)
                        took[(side, w)] = time.monotonic() - begun
            finally:
                await conn.close()
                await pgq_conn.close()
                await pool.close()
    conc = f"--concurrency {concurrency}" if concurrency else "default concurrency"
    print(f"drain: {describe}; {count:,} queued demo tasks {{steps 1, step_ms 0}} run by `taskcast worker` "
          f"processes ({conc}; serve + relay + one `all` subscriber running), vs {count:,} no-op jobs "
          f"drained by pgqueuer {version('pgqueuer')} consumer processes (batch size {batch_size}); "
          f"interleaved runs, medians; the time runs from starting the processes to the last completion")
    for w in worker_counts:
        tc, pq = results[w]
        if not tc or not pq:
            print(f"drain {w} worker{'s' * (w > 1)}: out of time before a run of both")
            continue
        ratio = statistics.median(r.rate for r in tc) / statistics.median(r.rate for r in pq)
        print(f"drain {w} worker{'s' * (w > 1)}: taskcast {runs_line(tc)} pgqueuer {runs_line(pq)} "
              f"ratio {ratio:.2f}")
        mt, mp = median_round(tc), median_round(pq)
        lags = [r.lag_s * 1000 for r in tc if r.lag_s is not None]
        lag = (f"{statistics.median(lags):.1f} ms (runs {', '.join(f'{x:.1f}' for x in lags)})"
               if lags else "n/a")
        window = statistics.median(r.window_rate for r in tc)
        print(f"  taskcast: first task.started -> last task.completed {window:,.0f}/s; "
              f"relay lag, last task.completed's `at` -> the subscriber: {lag}")
        for run in tc:
            print(f"    run check: {run.note}")
        print(f"    CPU in the median run (% of one core, {psutil.cpu_count()} cores): {cpu_line(mt)}; "
              f"{mt.waits}")
        print(f"    {mt.load}")
        window = statistics.median(r.window_rate for r in pq)
        print(f"  pgqueuer: first pick -> last success {window:,.0f}/s; "
              f"checks: {'; '.join(sorted({r.note for r in pq}))}")
        print(f"    CPU in the median run: {cpu_line(mp)}; {mp.waits}")
        print(f"    {mp.load}")
        # Steadier than the rates on a shared machine: a slow run is slow in wall time, less so in CPU.
        ours, theirs = cpu_per_task(tc), cpu_per_task(pq)
        cpu_ratio = ours / theirs if theirs else float("nan")
        print(f"  CPU per task, all measured processes (medians): taskcast {ours:.0f} µs, pgqueuer "
              f"{theirs:.0f} µs, ratio {cpu_ratio:.2f}; median runs: taskcast {cpu_us_line(mt)}; "
              f"pgqueuer {cpu_us_line(mp)}")
    if short:
        print(f"  (fewer than {runs} runs: the next would have overrun the {BUDGET_S:.0f} s budget)")
    if any("CAPPED" in r.note for tc, _ in results.values() for r in tc):
        print(f"  (a CAPPED run was stopped at its share of the {BUDGET_S:.0f} s budget: its rate is of the "
              f"tasks completed by then; --tasks N for a smaller backlog)")
    print("  procrastinate: not measured (its worker needs its own schema and app setup; skipped)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=TASKS)
    parser.add_argument("--workers", default=",".join(map(str, WORKERS)),
                        help="comma-separated worker process counts (default 1,2)")
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--concurrency", type=int, default=None, help="taskcast worker --concurrency")
    parser.add_argument("--batch-size", type=int, default=PGQ_BATCH, help="pgqueuer dequeue batch size")
    a = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(main(a.tasks, [int(x) for x in a.workers.split(",")], a.runs, a.concurrency, a.batch_size))
