"""Workers: crashes, pauses, questions, dependencies and fairness, with real processes."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from events import decide
from events.ids import TaskId
from events.kinds import builtin
from events.log import CreateTask, EventLog
from events.model import Event, EventType
from events.worker import Slots, Worker, WorkerConfig
from server.settings import Settings
from tests.waiting import cancelled, eventually, eventually_async

E = EventType


@pytest.fixture
def workers(settings: Settings) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start `taskcast worker` processes (lease 1.5 s); each is killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait(10)


def _worker(settings: Settings, log: Path | None = None, **extra_env: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url,
           "TASKCAST_LEASE_S": "1.5", "TASKCAST_LOG": "WARNING",
           "TASKCAST_WORKSPACE_ROOT": settings.workspace_root, **extra_env}
    out = log.open("wb") if log is not None else None
    try:
        return subprocess.Popen([sys.executable, "-m", "cli.main", "worker"], env=env,
                                stderr=out or None)
    finally:
        if out is not None:
            out.close()


async def _history(log: EventLog, task: TaskId) -> list[Event]:
    return await log.history(task)


async def _until_event(log: EventLog, task: TaskId, match: Any, within: float = 30) -> list[Event]:
    found: list[Event] = []

    async def seen() -> bool:
        found[:] = await log.history(task)
        return any(match(e) for e in found)

    await eventually_async(seen, within=within, poll_s=0.05)
    return found


def _steps(events: list[Event], type_: EventType) -> list[str]:
    return [e.data["step"] for e in events if e.type is type_]


async def test_kill_9_in_step_3_resumes_at_step_3_on_another_worker(
        event_log: EventLog, settings: Settings, workers: list[subprocess.Popen[bytes]]) -> None:
    """Invariant 5: after kill -9 mid step 3 of 5, another worker resumes at step 3; steps 1-2
    never run again; exactly one task.completed."""
    ack = await event_log.create(CreateTask("demo", "p", {"steps": 5, "step_ms": 600}))
    workers.append(_worker(settings))
    await _until_event(event_log, ack.task, lambda e: e.type is E.STEP_STARTED and e.data["step"] == "step_3")
    workers[0].kill()
    workers[0].wait(10)
    workers.append(_worker(settings))
    events = await _until_event(event_log, ack.task, lambda e: e.type is E.TASK_COMPLETED, within=60)
    assert _steps(events, E.STEP_STARTED) == ["step_1", "step_2", "step_3", "step_3", "step_4", "step_5"]
    assert _steps(events, E.STEP_COMPLETED) == [f"step_{i}" for i in range(1, 6)]
    assert [e.type for e in events].count(E.TASK_COMPLETED) == 1
    assert [e.version for e in events] == list(range(1, len(events) + 1))


async def test_a_paused_worker_writes_nothing_after_its_lease_is_taken(
        event_log: EventLog, settings: Settings, workers: list[subprocess.Popen[bytes]],
        tmp_path: Path) -> None:
    """Invariant 3: a worker SIGSTOPped past its lease while another takes over, then
    SIGCONTed, writes nothing more; the task completes once."""
    ack = await event_log.create(CreateTask("demo", "p", {"steps": 3, "step_ms": 2500}))
    paused_log = tmp_path / "paused.log"
    workers.append(_worker(settings, paused_log))
    first = await _until_event(event_log, ack.task, lambda e: e.type is E.STEP_STARTED)
    paused_name = next(e.data["worker"] for e in first if e.type is E.STEP_STARTED)
    workers[0].send_signal(signal.SIGSTOP)
    workers.append(_worker(settings))
    await _until_event(event_log, ack.task,
                       lambda e: e.type is E.STEP_STARTED and e.data["worker"] != paused_name)
    workers[0].send_signal(signal.SIGCONT)  # its step ends and it tries to write
    events = await _until_event(event_log, ack.task, lambda e: e.type is E.TASK_COMPLETED, within=60)
    takeover = next(i for i, e in enumerate(events)
                    if e.type is E.STEP_STARTED and e.data["worker"] != paused_name)
    assert all(e.data.get("worker") != paused_name for e in events[takeover:])
    assert _steps(events, E.STEP_COMPLETED) == ["step_1", "step_2", "step_3"]
    assert [e.type for e in events].count(E.TASK_COMPLETED) == 1
    # The resumed worker finds its lease gone (its heartbeat, or its next write, is refused
    # by the fence) and stops, saying so.
    await eventually(lambda: f"stopped {ack.task}" in paused_log.read_text(), 15)
    assert await _history(event_log, ack.task) == events


@pytest.fixture
async def in_process(settings: Settings, event_log: EventLog) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Workers run as tasks of this test; each is cancelled at the end."""
    tasks: list[asyncio.Task[None]] = []
    yield tasks
    await cancelled(*tasks)


def _start(settings: Settings, log: EventLog, tasks: list[asyncio.Task[None]], **config: Any) -> Worker:
    worker = Worker(settings.database_url, log, builtin(), WorkerConfig(**config))
    tasks.append(asyncio.create_task(worker.run(), name=f"worker {len(tasks)}"))
    return worker


def _claims_sent(worker: Worker) -> float:
    return worker.metrics.registry.get_sample_value("taskcast_worker_claims_total") or 0.0


async def test_an_idle_worker_claims_each_new_task_from_one_lane(
        event_log: EventLog, settings: Settings, in_process: list[asyncio.Task[None]]) -> None:
    """20 tasks created one after the other, each run to its end before the next: three
    claim statements each at most (the one that takes it, the same lane's next, and one
    when its run ends), not one per lane for each of those (no poll in the way: every 60 s)."""
    worker = _start(settings, event_log, in_process, poll_s=60.0)

    async def one() -> None:
        ack = await event_log.create(CreateTask("demo", "p", {"steps": 1, "step_ms": 0}))
        await _until_event(event_log, ack.task, lambda e: e.type is E.TASK_COMPLETED, within=10)

    await one()  # past the claims of the worker's start (each lane's, and the listener's hint)
    before = _claims_sent(worker)
    for _ in range(20):
        await one()
    assert _claims_sent(worker) - before <= 65  # 60: 3 a task (2 find nothing queued); 103 before


async def test_two_workers_drain_a_backlog_without_waiting_for_a_poll(
        event_log: EventLog, settings: Settings, in_process: list[asyncio.Task[None]]) -> None:
    """400 queued tasks, two workers of concurrency 8 claiming against each other, polls
    every 60 s: all complete within 30 s. A claim that comes back short under contention
    is no sign of an empty queue (a lane that took it for one waited for the poll)."""
    tasks = [(await event_log.create(CreateTask("demo", "p", {"steps": 1, "step_ms": 0}))).task
             for _ in range(400)]
    for _ in range(2):
        _start(settings, event_log, in_process, concurrency=8, poll_s=60.0)

    async def all_done() -> bool:
        views = await asyncio.gather(*(event_log.view(t) for t in tasks))
        return all(v["status"] == "completed" for v in views)

    await eventually_async(all_done, within=30, poll_s=0.2)


@pytest.mark.parametrize("held_by", ["scope limit", "kind cap"])
async def test_a_job_held_back_starts_as_soon_as_the_task_holding_it_ends(
        event_log: EventLog, settings: Settings, in_process: list[asyncio.Task[None]],
        held_by: str) -> None:
    """Two tasks, room for one at a time (a per-scope limit of 1, or their kind's cap of 1):
    the second starts once the first ends, without waiting for the next poll (60 s)."""
    kinds = builtin()
    kinds["capped"] = dataclasses.replace(kinds["demo"], name="capped", max_running=1)
    config = WorkerConfig(poll_s=60.0, scope_limit=1 if held_by == "scope limit" else None)
    worker = Worker(settings.database_url, event_log, kinds, config)
    in_process.append(asyncio.create_task(worker.run(), name="worker"))
    kind = "capped" if held_by == "kind cap" else "demo"
    first, second = [(await event_log.create(CreateTask(kind, "p", {"steps": 1, "step_ms": 200}))).task
                     for _ in range(2)]
    ended = await _until_event(event_log, first, lambda e: e.type is E.TASK_COMPLETED, within=10)
    started = await _until_event(event_log, second, lambda e: e.type is E.TASK_STARTED, within=10)
    assert started[-1].at >= ended[-1].at  # one at a time


async def test_a_question_survives_a_worker_restart_and_is_asked_once(
        event_log: EventLog, settings: Settings, in_process: list[asyncio.Task[None]]) -> None:
    """The task parks on its question (no worker holds it); a restarted worker resumes it once
    answered; the question was asked once and earlier steps did not run again."""
    ack = await event_log.create(CreateTask("demo", "p", {"steps": 3, "step_ms": 10, "ask_step": 2}))
    _start(settings, event_log, in_process)
    await _until_event(event_log, ack.task, lambda e: e.type is E.TASK_QUESTION)
    await cancelled(in_process.pop())  # the worker goes away (and is gone: awaited)
    view = await event_log.view(ack.task)
    assert view["status"] == "waiting_answer" and view["questions"][0]["options"] == ["approve", "deny"]
    await event_log.command(ack.task, lambda v: decide.answer(v, "q_1", "approve"))
    _start(settings, event_log, in_process)
    events = await _until_event(event_log, ack.task, lambda e: e.type is E.TASK_COMPLETED)
    assert [e.type for e in events].count(E.TASK_QUESTION) == 1
    assert _steps(events, E.STEP_STARTED) == ["step_1", "step_2", "step_3"]


async def test_a_failed_dependency_fails_the_chain_with_the_reason(
        event_log: EventLog, settings: Settings, in_process: list[asyncio.Task[None]]) -> None:
    """A -> B -> C where B fails: C ends failed, naming B."""
    a = await event_log.create(CreateTask("demo", "p", {"steps": 1, "step_ms": 10}))
    b = await event_log.create(CreateTask("demo", "p", {"steps": 1, "ask_step": 1}, depends_on=[a.task]))
    c = await event_log.create(CreateTask("demo", "p", {"steps": 1}, depends_on=[b.task]))
    assert b.status == c.status == "waiting"
    _start(settings, event_log, in_process, maintain_every_s=0.2)
    await _until_event(event_log, b.task, lambda e: e.type is E.TASK_QUESTION)
    await event_log.command(b.task, lambda v: decide.answer(v, "q_1", "deny"))
    events = await _until_event(event_log, c.task, lambda e: e.type is E.TASK_FAILED)
    assert [e.type for e in events] == [E.TASK_CREATED, E.TASK_FAILED]
    assert b.task in events[-1].data["error"] and "failed" in events[-1].data["error"]
    assert (await event_log.view(a.task))["status"] == "completed"
    assert (await event_log.view(b.task))["status"] == "failed"


async def _running_peaks(database_url: str, tasks: int, within: float, query: str,
                         *args: object) -> dict[str, int]:
    """Poll `query` (rows of `key`, `n`: running jobs) every 2 ms until `tasks` tasks have
    completed; the most each key ever had."""
    peak: dict[str, int] = defaultdict(int)
    watcher = await asyncpg.connect(database_url)

    async def all_done() -> bool:
        for row in await watcher.fetch(query, *args):
            peak[row["key"]] = max(peak[row["key"]], row["n"])
        done = await watcher.fetchval("SELECT count(*) FROM tasks WHERE status = 'completed'")
        return bool(done == tasks)

    try:
        await eventually_async(all_done, within=within, poll_s=0.002)
    finally:
        await watcher.close()
    return peak


async def test_a_per_scope_limit_holds_under_concurrent_claims(
        event_log: EventLog, settings: Settings, database_url: str,
        in_process: list[asyncio.Task[None]]) -> None:
    """200 demo tasks over 3 scopes, limit 2 per scope, two workers claiming concurrently:
    never more than 2 running in a scope in any poll of the jobs, and every task completes."""
    tasks = [(await event_log.create(CreateTask("demo", f"scope:{i % 3}", {"steps": 2, "step_ms": 4}))).task
             for i in range(200)]
    for _ in range(2):
        _start(settings, event_log, in_process, concurrency=8, scope_limit=2)
    peak = await _running_peaks(database_url, len(tasks), 120,
                                "SELECT scope AS key, count(*) AS n FROM jobs WHERE state = 'running' "
                                "GROUP BY scope")
    assert max(peak.values()) == 2  # reached, never passed
    # Not checked against the log: positions order transactions by xid, not by commit. A
    # claim whose transaction got its xid first (claiming another job of its batch) may
    # count a scope's running jobs after an end with a later xid committed, so in the log
    # its `task.started` comes before the `task.completed` that made room for it (CI saw
    # 3 "running" that way once).


async def test_a_worker_never_runs_more_than_its_concurrency_with_claims_overlapping(
        event_log: EventLog, settings: Settings, database_url: str,
        in_process: list[asyncio.Task[None]]) -> None:
    """120 short tasks, concurrency 6, two claims in flight at a time: the worker holds at
    most 6 leases at every instant (and reaches 6), and every task completes."""
    tasks = [(await event_log.create(CreateTask("demo", "p", {"steps": 1, "step_ms": 15}))).task
             for _ in range(120)]
    worker = _start(settings, event_log, in_process, concurrency=6)
    peak = await _running_peaks(database_url, len(tasks), 60,
                                "SELECT 'held' AS key, count(*) AS n FROM jobs WHERE state = 'running' "
                                "AND lease_owner = $1", worker.name)
    assert peak["held"] == 6


async def test_a_kind_with_its_own_cap_never_passes_it_while_others_fill_the_worker(
        event_log: EventLog, settings: Settings, database_url: str,
        in_process: list[asyncio.Task[None]]) -> None:
    """A kind capped at 2 (as the built-in kinds that run processes are) beside an uncapped
    one, concurrency 8: never more than 2 of it at once, the other kind takes the rest
    of the slots meanwhile, and every task completes."""
    kinds = builtin()
    kinds["capped"] = dataclasses.replace(kinds["demo"], name="capped", max_running=2)
    worker = Worker(settings.database_url, event_log, kinds, WorkerConfig(concurrency=8))
    tasks = [(await event_log.create(CreateTask(kind, "p", {"steps": 1, "step_ms": 40}))).task
             for _ in range(30) for kind in ("capped", "demo")]
    in_process.append(asyncio.create_task(worker.run(), name="worker"))
    peak = await _running_peaks(database_url, len(tasks), 60,
                                "SELECT coalesce(kind, 'all') AS key, count(*) AS n FROM jobs "
                                "WHERE state = 'running' GROUP BY ROLLUP (kind)")
    assert peak["capped"] == 2 and peak["demo"] >= 6 and peak["all"] <= 8, dict(peak)


def test_a_nearly_full_capped_kind_never_shrinks_the_claims_of_the_others() -> None:
    """Slots at concurrency 64 with two kinds capped at 4, one of them running 3: the
    uncapped kinds are claimed 16 at a time (a quarter), the capped ones 1 (the least room);
    a full capped kind is left out; what a claim in flight reserved it gives back."""
    slots = Slots(64, {"shell": 4, "git": 4})
    groups = slots.groups(["demo", "shell", "plugin", "git"])
    assert groups == [["demo", "plugin"], ["shell", "git"]]
    for _ in range(3):
        slots.take("shell")
    assert [slots.plan(g) for g in groups] == [(["demo", "plugin"], 16), (["shell", "git"], 1)]
    slots.take("shell")
    assert slots.plan(groups[1]) == (["git"], 4)
    slots.reserve(["git"], 4)
    assert slots.plan(groups[1]) == ([], 0) and slots.contended()
    slots.reserve(["git"], -4)
    assert slots.plan(groups[1]) == (["git"], 4) and not slots.contended()


async def test_a_running_worker_trims_the_history_of_ended_tasks(
        event_log: EventLog, settings: Settings, in_process: list[asyncio.Task[None]]) -> None:
    """Retention runs by itself in the worker's maintenance loop: an ended task older than
    `retention_s` keeps only its last event, whose view stays readable."""
    ack = await event_log.create(CreateTask("demo", "p", {"steps": 2, "step_ms": 0}))
    _start(settings, event_log, in_process, retention_s=0.2, prune_every_s=0.2, maintain_every_s=0.1)

    async def trimmed() -> bool:
        events = await event_log.history(ack.task)
        return len(events) == 1 and events[0].type is E.TASK_COMPLETED

    await eventually_async(trimmed, within=15, poll_s=0.1)
    assert (await event_log.view(ack.task))["status"] == "completed"
    assert await event_log.retention_floor() > ack.position


async def test_a_worker_stops_when_a_maintenance_round_swallowed_its_cancel(
        event_log: EventLog, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancel eaten by an await inside a janitor round (as redis-py's commands can) still
    stops the worker: its loops pause with events.aio.pause, not asyncio.sleep."""
    worker = Worker(settings.database_url, event_log, builtin(), WorkerConfig(maintain_every_s=0.05))
    entered = asyncio.Event()

    async def round_() -> bool:
        entered.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            pass
        return False

    monkeypatch.setattr(worker.janitor, "round", round_)
    running = asyncio.create_task(worker.run(), name="worker")
    await asyncio.wait_for(entered.wait(), 10)
    await cancelled(running, within=5)


async def test_one_heartbeat_keeps_every_running_task_leased(
        event_log: EventLog, settings: Settings, in_process: list[asyncio.Task[None]]) -> None:
    """Tasks running three times as long as the lease, with the janitor rescuing expired
    leases twice a second, each complete on their first claim: the worker's heartbeat
    kept all their leases."""
    acks = [await event_log.create(CreateTask("demo", "p", {"steps": 2, "step_ms": 2000})) for _ in range(3)]
    _start(settings, event_log, in_process, lease_s=1.5, maintain_every_s=0.5)
    for ack in acks:
        events = await _until_event(event_log, ack.task, lambda e: e.type is E.TASK_COMPLETED)
        assert [e.type for e in events].count(E.TASK_STARTED) == 1, events
        assert _steps(events, E.STEP_STARTED) == ["step_1", "step_2"]


async def test_the_heartbeat_stops_a_task_whose_lease_was_taken_and_brings_back_a_cancel(
        event_log: EventLog, settings: Settings, database_url: str,
        in_process: list[asyncio.Task[None]]) -> None:
    """A job whose fence moved on (another worker took it) stops at the worker's next
    heartbeat and writes nothing more; a cancel flag raised without a notification reaches
    its task through the heartbeat."""
    taken = await event_log.create(CreateTask("demo", "p", {"steps": 1, "step_ms": 20_000}))
    flagged = await event_log.create(CreateTask("demo", "p", {"steps": 1, "step_ms": 20_000}))
    worker = _start(settings, event_log, in_process, lease_s=3)
    for ack in (taken, flagged):
        await _until_event(event_log, ack.task, lambda e: e.type is E.STEP_STARTED)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE jobs SET fence = fence + 1, lease_owner = 'another', "
                           "lease_expires_at = now() + interval '1 hour' WHERE task_id = $1", taken.task)
        await conn.execute("UPDATE jobs SET cancel_requested = true WHERE task_id = $1", flagged.task)
    finally:
        await conn.close()
    await _until_event(event_log, flagged.task, lambda e: e.type is E.TASK_CANCELLED, within=20)
    await eventually(lambda: taken.task not in worker._contexts, 10)
    assert [e.type for e in await _history(event_log, taken.task)] == [
        E.TASK_CREATED, E.TASK_STARTED, E.STEP_STARTED]
