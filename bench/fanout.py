"""Fan-out throughput: update frames delivered per second to 1,000 subscribers of one scope.

`taskcast serve --processes P` (one node process, and then P node processes sharing the
port: `--processes 1,2` measures both in the same run and prints the ratio) and `taskcast
relay` run as subprocesses on a scratch database;
a child process (rawws.py) holds 1,000 raw websockets, each subscribed to `scope:fan`,
counting update frames without parsing them. This process appends N events to 50
running tasks of scope `fan` through EventLog.append, 100 per transaction, from 4
coroutines, as fast as it can; the clock runs from the first append to the moment the
last socket has received all N frames. Each task stays on one step, so its view (carried
by every frame) stays small. A warm-up round runs first; then RUNS measured rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from dataclasses import dataclass

import psutil
import uvloop
from benchlib import REDIS_CLUSTER, redis_server, scratch_database, unique
from rawws import SubscriberProcess
from subprocs import (
    Background,
    Children,
    CpuMeter,
    cancel_on_sigterm,
    metrics,
    postgres_processes,
    raise_nofile,
    tree,
    wait_metric,
)

from events import db
from events.fold import View
from events.ids import TaskId
from events.log import CreateTask, EventLog
from events.model import EventType, NewEvent

SCOPE = "fan"
SUBSCRIBERS = 1000
EVENTS = 2000
BATCH = 100
TASKS = 50
WRITERS = 4
RUNS = 3
WARMUP_EVENTS = 200
ROUND_TIMEOUT_S = 40.0
BUDGET_S = 85.0
CLEANUP_S = 8.0
PEERS = ("reference peers, measured on this machine by others (not by this script): "
         "Node socket.io + Redis adapter 320k deliveries/s; python-socketio 25k deliveries/s")


@dataclass
class FanTask:
    """A running task on one step (`s1`) that gets step.progress events forever."""

    id: TaskId
    view: View
    appended: int = 0

    def batch(self, size: int) -> list[NewEvent]:
        events = [NewEvent(EventType.STEP_PROGRESS,
                           {"step": "s1", "progress": (self.appended + k) % 100 / 100})
                  for k in range(size)]
        if self.view["step"] is None:
            events[0] = NewEvent(EventType.STEP_STARTED, {"step": "s1"})
        return events

    async def append(self, log: EventLog, events: list[NewEvent]) -> None:
        self.view, _ = await log.append(self.id, self.view, events)
        self.appended += len(events)


async def running_tasks(log: EventLog, count: int, scope: str) -> list[FanTask]:
    """`count` demo tasks of `scope`, each created and then started (no worker runs them)."""
    async def one() -> FanTask:
        ack = await log.create(CreateTask(kind="demo", scope=scope))
        view, _ = await log.append(ack.task, await log.view(ack.task), [NewEvent(EventType.TASK_STARTED, {})])
        return FanTask(ack.task, view)

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def append_events(log: EventLog, tasks: list[FanTask], events: int, batch: int, writers: int) -> None:
    """`events` events in transactions of `batch`, from `writers` coroutines, each owning
    its share of the tasks (no version conflicts)."""
    batches = [batch] * (events // batch) + ([events % batch] if events % batch else [])

    async def writer(w: int) -> None:
        mine = tasks[w::writers]
        for n, size in enumerate(batches[w::writers]):
            task = mine[n % len(mine)]
            await task.append(log, task.batch(size))

    await asyncio.gather(*(writer(w) for w in range(writers)))


async def one_round(log: EventLog, tasks: list[FanTask], subs: SubscriberProcess,
                    events: int) -> tuple[float, float, dict[str, object]]:
    """(seconds from the first append to the last socket's last frame, seconds appending,
    the subscribers' results)."""
    await subs.arm(events, ROUND_TIMEOUT_S)
    started = time.monotonic()
    await append_events(log, tasks, events, BATCH, WRITERS)
    appended = time.monotonic() - started
    results = await subs.results(ROUND_TIMEOUT_S + 10)
    if not results["done_at"]:
        counts = sorted(results["counts"])  # type: ignore[type-var]
        raise RuntimeError(f"not every socket got its {events} frames within {ROUND_TIMEOUT_S:.0f} s: "
                           f"min {counts[0]}, median {counts[len(counts) // 2]}, lost {results['lost']}")
    return results["done_at"] - started, appended, results  # type: ignore[operator]


async def main(subscribers: int, events: int, runs: int, processes: list[int], cluster: bool) -> None:
    cancel_on_sigterm()
    raise_nofile()
    with redis_server(cluster) as redis_url:
        figures = [await measure(subscribers, events, runs, count, redis_url, cluster) for count in processes]
    if len(figures) > 1:
        print(f"fan-out with --processes {processes[-1]} / --processes {processes[0]}, same run: "
              f"{figures[-1] / figures[0]:.2f}x")


async def measure(subscribers: int, events: int, runs: int, processes: int, redis_url: str,
                  cluster: bool) -> float:
    """One configuration's rounds, printed; its median deliveries/s."""
    deadline = time.monotonic() + BUDGET_S
    async with asyncio.timeout(BUDGET_S), scratch_database("fanout") as url, \
            Children(url, redis_url, unique("taskcast:bench:fanout")) as children:
        relay = children.start("relay")
        node, port = await children.serve(ready=True, processes=processes)
        pool = await db.create_pool(url, min_size=WRITERS, max_size=WRITERS)
        try:
            log = EventLog(pool)
            tasks = await running_tasks(log, TASKS, SCOPE)
            # Every event so far has reached the node before anyone subscribes.
            await wait_metric(port, "taskcast_updates_routed_total", 2 * TASKS)
            async with SubscriberProcess(port, subscribers, f"scope:{SCOPE}") as subs:
                subs_ps = psutil.Process(subs.proc.pid)
                await one_round(log, tasks, subs, WARMUP_EVENTS)
                rounds = []
                for _ in range(runs):
                    if rounds and time.monotonic() + 1.5 * rounds[-1][0] + CLEANUP_S > deadline:
                        break  # a slow node: fewer rounds rather than overrunning the budget
                    me = psutil.Process(os.getpid())
                    meter = CpuMeter([*tree(node.ps), relay.ps, subs_ps, me],
                                     find=lambda: [*tree(node.ps), relay.ps, subs_ps, me,  # noqa: B023
                                                   *postgres_processes()]).start()
                    background = Background().start()
                    try:
                        took, appended, results = await one_round(log, tasks, subs, events)
                    except RuntimeError:
                        node.check_alive()
                        raise
                    node_pids = {p.pid for p in tree(node.ps)}
                    rounds.append((took, appended, results, meter.stop(), background.stop(), node_pids))
                m = await metrics(port)
        finally:
            await pool.close()
    took_all = sorted(rounds, key=lambda r: r[0])
    took, appended, results, meter, load, node_pids = took_all[len(took_all) // 2]
    frame_bytes = results["bytes"] / (subscribers * events)  # type: ignore[operator]
    deliveries = subscribers * events
    print(f"fan-out throughput: {subscribers:,} raw websocket subscribers of scope:{SCOPE} on "
          f"`taskcast serve --processes {processes}` (+ `taskcast relay`, subprocesses); "
          f"{events:,} events per round "
          f"({BATCH} per transaction, {TASKS} tasks, {WRITERS} writers) = {deliveries:,} deliveries; "
          f"update frames ~{frame_bytes:.0f} bytes; median of {len(rounds)} rounds after a "
          f"{WARMUP_EVENTS}-event warm-up; uvloop; {psutil.cpu_count()} CPUs; through "
          f"{REDIS_CLUSTER if cluster else 'one Redis'}")
    print(f"  {deliveries / took:,.0f} deliveries/s  ({events / took:,.0f} events/s to {subscribers:,} "
          f"sockets; first append -> last frame on the last socket {took * 1000:.0f} ms; "
          f"appends took {appended * 1000:.0f} ms)")
    print(f"  rounds: {', '.join(f'{subscribers * events / r[0]:,.0f}' for r in rounds)} deliveries/s; "
          f"resyncs {m.get('taskcast_resyncs_total', 0):.0f}, gaps filled "
          f"{m.get('taskcast_gaps_filled_total', 0):.0f}")
    nodes = [p for p in meter.used if p in node_pids]
    pg = [p for p in meter.used if p not in (*nodes, relay.pid, subs_ps.pid, os.getpid())]
    print(f"  CPU in the median round (% of one core): node {meter.percent(nodes):.0f}%, relay "
          f"{meter.percent([relay.pid]):.0f}%, subscribers {meter.percent([subs_ps.pid]):.0f}%, appender "
          f"{meter.percent([os.getpid()]):.0f}%, PostgreSQL (every backend) {meter.percent(pg):.0f}%")
    print(f"  {load}")
    print(f"  {PEERS}; this script prints taskcast's figure only")
    return deliveries / took


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int, default=SUBSCRIBERS)
    parser.add_argument("--events", type=int, default=EVENTS)
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--processes", default="1", help="node processes, e.g. 1,2 (each measured in turn)")
    parser.add_argument("--redis-cluster", action="store_true",
                        help="through an embedded Redis Cluster instead of TASKCAST_BENCH_REDIS_URL")
    args = parser.parse_args()
    uvloop.run(main(args.subscribers, args.events, args.runs, [int(p) for p in args.processes.split(",")],
                    args.redis_cluster))
