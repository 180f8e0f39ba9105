"""Commit-to-socket latency of live updates at 50 events/s, fanned out to 1,000 subscribers.

Same setup as fanout.py: `taskcast serve` and `taskcast relay` as subprocesses, and a child
process (rawws.py) holding 1,000 raw websockets subscribed to `scope:lat`. This process
appends one event every 20 ms (one per transaction, round-robin over 10 running tasks) for
10 s, three times in one run: quiet, then with a foreign write transaction (`BEGIN; INSERT`)
held open for the whole phase (10 s) in the same database, then in another database of the
same server (invariant 10: neither may delay taskcast), then with that foreign transaction
while another client (a process of its own) appends 1,000 events/s to another taskcast
database of the server. It notes time.monotonic() just before each `append()` and just after
it returns; the commit happens in between. Every subscriber notes when each of its update
frames arrived (frames are counted, not parsed: the k-th frame on a socket is the k-th
event, as the events are appended one after the other); 10 of them also parse each frame and
check that its task and version are the k-th event's. Latency = arrival - append return (a
lower bound of commit -> socket) and arrival - append call (an upper bound), over every
(event, socket) pair; also the latest socket of each event.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing
import os
import time
from array import array
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import psutil
import uvloop
from benchlib import (
    REDIS_CLUSTER,
    app_database,
    foreign_transaction,
    percentile,
    redis_server,
    scratch_database,
    start_waker,
    tap,
    unique,
)
from fanout import FanTask, running_tasks
from rawws import SubscriberProcess
from subprocs import (
    Background,
    Children,
    CpuMeter,
    cancel_on_sigterm,
    metrics,
    raise_nofile,
    tree,
    wait_metric,
)

from events import db
from events.log import EventLog
from events.relay.bus import connect

SCOPE = "lat"
SUBSCRIBERS = 1000
PARSED = 10
TASKS = 10
RATE_PER_S = 50
DURATION_S = 10.0  # per phase
WARMUP_S = 2.0
BUDGET_S = 88.0
TARGET_P99_MS = 15.0
BUSY_PER_S = 1000


def line(ms: list[float]) -> str:
    ms.sort()
    return (f"p50 {percentile(ms, 50):.2f} ms  p90 {percentile(ms, 90):.2f} ms  "
            f"p99 {percentile(ms, 99):.2f} ms  max {ms[-1]:.2f} ms  (n={len(ms):,})")


Appended = list[tuple[str, int, float, float]]


async def paced(log: EventLog, tasks: list[FanTask], count: int, interval: float) -> Appended:
    """Append `count` single events, one every `interval` s on an absolute schedule (a late
    one is not made up for by bunching). (task, version, before call, after return) each."""
    out: Appended = []
    start = time.monotonic() + 0.05
    for i in range(count):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = tasks[i % len(tasks)]
        events = task.batch(1)
        before = time.monotonic()
        await task.append(log, events)
        out.append((task.id, task.view["version"], before, time.monotonic()))
    return out


@contextlib.asynccontextmanager
async def busy_client(url: str, duration: float) -> AsyncIterator[None]:
    """Another client, in a process of its own: BUSY_PER_S single-event appends per second to
    the taskcast database `url`, from 8 coroutines, for `duration` s once it is appending
    (the block starts then, past its start-up). Stopped on exit."""
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    proc = context.Process(target=_busy_main, args=(url, duration, ready))
    proc.start()
    try:
        if not await asyncio.to_thread(ready.wait, 30):
            raise SystemExit("the busy client did not start within 30 s")
        yield
    finally:
        await asyncio.to_thread(proc.join, duration + 20)
        if proc.is_alive():
            proc.kill()
            await asyncio.to_thread(proc.join, 5)


def _busy_main(url: str, duration: float, ready: Any) -> None:
    uvloop.run(_busy(url, duration, ready))


async def _busy(url: str, duration: float, ready: Any) -> None:
    pool = await db.create_pool(url, min_size=8, max_size=8)
    try:
        log = EventLog(pool)
        tasks = await running_tasks(log, 32, "busy")
        ready.set()
        end = time.monotonic() + duration

        async def writer(mine: list[FanTask]) -> None:
            i, start = 0, time.monotonic()
            while (due := start + i * 8 / BUSY_PER_S) < end:
                if (delay := due - time.monotonic()) > 0:
                    await asyncio.sleep(delay)
                await mine[i % len(mine)].append(log, mine[i % len(mine)].batch(1))
                i += 1

        await asyncio.gather(*(writer(tasks[w::8]) for w in range(8)))
    finally:
        await pool.close()


@dataclass
class Phase:
    """One measured stretch: `rate` events/s for `duration` s, with `foreign` (a database url)
    holding a write transaction open throughout, or nothing open."""

    name: str
    foreign: str | None
    busy: str | None = None  # a database another client appends BUSY_PER_S events/s to
    appended: Appended = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    cpu: str = ""
    load: str = ""


async def main(subscribers: int, rate: int, duration: float, processes: int, cluster: bool,
               budget_s: float) -> None:
    cancel_on_sigterm()
    raise_nofile()
    with redis_server(cluster) as redis_url:
        await measure(subscribers, rate, duration, processes, redis_url, cluster, budget_s)


async def measure(subscribers: int, rate: int, duration: float, processes: int, redis_url: str,
                  cluster: bool, budget_s: float = BUDGET_S) -> None:
    count = int(rate * duration)
    warmup = int(rate * WARMUP_S)
    channel = unique("taskcast:bench:latfan")
    published: dict[tuple[str, int], float] = {}
    async with asyncio.timeout(budget_s), scratch_database("latfan") as url, app_database("latfan") as app, \
            scratch_database("busy") as busy, Children(url, redis_url, channel) as children:
        redis = connect(redis_url)
        phases = [Phase("quiet", None),
                  Phase(f"a foreign write transaction open {duration:.0f} s, same database", url),
                  Phase(f"a foreign write transaction open {duration:.0f} s, another database", app),
                  Phase(f"both: that and another client appending {BUSY_PER_S:,}/s to another "
                        f"taskcast database", url, busy)]
        tapping = asyncio.create_task(tap(redis, channel, published))
        relay = children.start("relay")
        node, port = await children.serve(ready=True, processes=processes)
        pool = await db.create_pool(url, min_size=2, max_size=2)
        try:
            log = EventLog(pool, on_append=start_waker(redis, channel).poke)
            tasks = await running_tasks(log, TASKS, SCOPE)
            for task in tasks:  # each task on its step already: every measured event is a step.progress
                await task.append(log, task.batch(1))
            await wait_metric(port, "taskcast_updates_routed_total", 3 * TASKS)
            async with SubscriberProcess(port, subscribers, f"scope:{SCOPE}", parse=PARSED,
                                         record=True) as subs:
                await subs.arm(warmup, 30)
                await paced(log, tasks, warmup, 1 / rate)
                await subs.results(30)
                subs_ps = psutil.Process(subs.proc.pid)
                for phase in phases:
                    await subs.arm(count, duration + 30)
                    background = Background().start()
                    nodes = tree(node.ps)
                    meter = CpuMeter([*nodes, relay.ps, subs_ps]).start()
                    async with contextlib.AsyncExitStack() as stack:
                        if phase.busy is not None:
                            await stack.enter_async_context(busy_client(phase.busy, duration + 1))
                        if phase.foreign is not None:
                            await stack.enter_async_context(foreign_transaction(phase.foreign))
                        phase.appended = await paced(log, tasks, count, 1 / rate)
                    phase.results = await subs.results(60)  # (v1: every event came after COMMIT)
                    phase.load = background.stop()
                    meter.stop()
                    phase.cpu = (f"node {meter.percent([p.pid for p in nodes]):.0f}%, relay "
                                 f"{meter.percent([relay.pid]):.0f}%, subscribers "
                                 f"{meter.percent([subs_ps.pid]):.0f}%")
                    node.check_alive()
            m = await metrics(port)
        finally:
            tapping.cancel()
            await asyncio.gather(tapping, return_exceptions=True)
            await pool.close()
            await redis.aclose()

    print(f"commit -> socket latency: {count:,} events at {rate}/s for {duration:.0f} s per phase, one "
          f"per transaction over {TASKS} tasks, to {subscribers:,} raw websocket subscribers of "
          f"scope:{SCOPE} on `taskcast serve --processes {processes}` (+ `taskcast relay`, "
          f"subprocesses), after a "
          f"{WARMUP_S:.0f} s warm-up; uvloop; phases in one run; through "
          f"{REDIS_CLUSTER if cluster else 'one Redis'}")
    lows = {}
    for i, phase in enumerate(phases):
        lows[phase.name] = report(i, phase, published, count, m)
    quiet = lows[phases[0].name]
    print(f"  gaps the node filled from the log: {m.get('taskcast_gaps_filled_total', 0):.0f}")
    print("  delta against quiet (lower bound, every (event, socket)):")
    for phase in phases[1:]:
        low = lows[phase.name]
        print(f"    {phase.name}: p50 {percentile(low, 50) - percentile(quiet, 50):+.2f} ms, "
              f"p99 {percentile(low, 99) - percentile(quiet, 99):+.2f} ms (target < +50 ms at p99)")


def report(index: int, phase: Phase, published: dict[tuple[str, int], float], count: int,
           m: dict[str, float]) -> list[float]:
    """Check one phase's frames and print its figures; its sorted lower-bound latencies."""
    results, appended = phase.results, phase.appended
    counts = results["counts"]
    if min(counts) < count:
        raise SystemExit(f"{phase.name}: not every socket got its {count} frames: min {min(counts)}, "
                         f"lost {results['lost']}, resyncs {m.get('taskcast_resyncs_total')}")
    # The parsing subscribers: the k-th frame is the k-th event appended.
    expected = [(task, version) for task, version, _, _ in appended]
    for parsed in results["parsed"]:
        got = [(task, version) for _, task, version in parsed]
        if got != expected:
            first = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
                         min(len(got), len(expected)))
            raise SystemExit(f"a parsing subscriber saw frames in another order than the appends "
                             f"(first difference at frame {first})")
    lower: list[float] = []
    upper: list[float] = []
    node_ms: list[float] = []
    latest = [0.0] * count
    tapped_at = [published.get((task, version), math.nan) for task, version, _, _ in appended]
    for blob in results["arrivals"]:
        times = array("d")
        times.frombytes(blob)
        for k, (t, (_, _, before, after)) in enumerate(zip(times, appended, strict=True)):
            if math.isnan(t):
                continue
            lower.append((t - after) * 1000)
            upper.append((t - before) * 1000)
            if not math.isnan(tapped_at[k]):
                node_ms.append((t - tapped_at[k]) * 1000)
            latest[k] = max(latest[k], t)
    last_lower = [(latest[k] - after) * 1000 for k, (_, _, _, after) in enumerate(appended)]
    last_node = [(latest[k] - tapped_at[k]) * 1000 for k in range(count) if not math.isnan(tapped_at[k])]
    if os.environ.get("TASKCAST_BENCH_DUMP"):  # per event, for a closer look: a CSV
        with open(f"{os.environ['TASKCAST_BENCH_DUMP']}.{index}.csv", "w") as out:
            out.write("k,append_called,append_returned,redis_seen,last_socket\n")
            for k, (_, _, before, after) in enumerate(appended):
                out.write(f"{k},{before:.6f},{after:.6f},{tapped_at[k]:.6f},{latest[k]:.6f}\n")
    append_ms = [(after - before) * 1000 for _, _, before, after in appended]
    relay_ms = [(published[(task, version)] - after) * 1000 for task, version, _, after in appended
                if (task, version) in published]
    print(f" {phase.name}:")
    print(f"  arrival - append returned (lower bound), every (event, socket): {line(lower)}")
    print(f"  arrival - append called (upper bound), every (event, socket):   {line(upper)}")
    print(f"  arrival at the last socket of each event - append returned:      {line(last_lower)}")
    print(f"  relay part: a Redis subscriber here gets the relay's message - append returned: "
          f"{line(relay_ms)}")
    print(f"  node part: arrival - that Redis subscriber got the message, every (event, socket): "
          f"{line(node_ms)}")
    print(f"  node part to the last socket of each event: {line(last_node)}")
    print(f"  append() itself: {line(append_ms)}")
    p99 = percentile(lower, 99)
    print(f"  target p99 <= {TARGET_P99_MS:.0f} ms: {'met' if p99 <= TARGET_P99_MS else 'NOT met'} "
          f"(lower bound p99 {p99:.2f} ms); {PARSED} subscribers parsed every frame and saw the events in "
          f"append order")
    print(f"  CPU meanwhile (% of one core): {phase.cpu}")
    print(f"  {phase.load}")
    return lower


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int, default=SUBSCRIBERS)
    parser.add_argument("--rate", type=int, default=RATE_PER_S, help="events per second")
    parser.add_argument("--duration", type=float, default=DURATION_S, help="seconds")
    parser.add_argument("--processes", type=int, default=1, help="node processes of `taskcast serve`")
    parser.add_argument("--redis-cluster", action="store_true",
                        help="through an embedded Redis Cluster instead of TASKCAST_BENCH_REDIS_URL")
    parser.add_argument("--budget", type=float, default=BUDGET_S,
                        help="seconds the whole run may take (10,000 subscribers need several minutes)")
    args = parser.parse_args()
    uvloop.run(main(args.subscribers, args.rate, args.duration, args.processes, args.redis_cluster,
                    args.budget))
