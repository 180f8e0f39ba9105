"""Child processes belong to their task attempt: kill -9 of a worker mid-step kills what it
started, a re-run on another worker is the only run alive, one agent per workspace ever.
Real `taskcast worker` processes (tests/events/test_worker.py), found by a scan of every
process's environment for the task's markers (events.attempt) and by process group."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator

import psutil
import pytest

from events import decide
from events.ids import TaskId
from events.kinds.agent import STATE_FILE
from events.kinds.provision import request, stop_agent
from events.log import CreateTask, EventLog
from events.model import EventType
from server.settings import Settings
from tests.events.kinds_support import fences, of_task, scope_dir
from tests.events.test_worker import _until_event, _worker
from tests.waiting import eventually

E = EventType
SCOPE = "tenant:crash"


@pytest.fixture
def worker_procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """`taskcast worker` processes of this test; each is killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def _processes(task: TaskId, at_least: int, fence: int | None = None) -> list[psutil.Process]:
    found: list[psutil.Process] = []

    def enough() -> bool:
        found[:] = of_task(task, fence)
        return len(found) >= at_least

    await eventually(enough, within=20)
    return found


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_kill_9_of_a_worker_mid_shell_kills_its_processes_before_the_rerun(
        event_log: EventLog, settings: Settings, worker_procs: list[subprocess.Popen[bytes]]) -> None:
    """kill -9 of a worker during a shell step: the command's process group (recorded by the
    markers) dies with it; the step re-run on another worker is the only run alive; a
    cancel then leaves no process of the task anywhere."""
    script = "sleep 300 & sleep 300 & wait"
    ack = await event_log.create(CreateTask("shell", SCOPE, {"command": ["sh", "-c", script]}))
    worker_procs.append(_worker(settings, TASKCAST_SHELL_ALLOW="sh"))
    first = await _processes(ack.task, 3)  # sh and its two sleeps
    (old_fence,) = fences(first)
    pgids = {os.getpgid(p.pid) for p in first}
    assert len(pgids) == 1  # one process group for the step's command
    worker_procs[0].kill()
    worker_procs[0].wait(10)
    await eventually(lambda: of_task(ack.task, old_fence) == [] and _group_gone(next(iter(pgids))), within=10)
    worker_procs.append(_worker(settings, TASKCAST_SHELL_ALLOW="sh"))
    second = await _processes(ack.task, 3)
    assert old_fence not in fences(second) and len(fences(second)) == 1
    await event_log.command(ack.task, lambda v: decide.cancel(v, "enough"))
    await _until_event(event_log, ack.task, lambda e: e.type is E.TASK_CANCELLED, within=20)
    await eventually(lambda: of_task(ack.task) == [], within=10)


async def test_kill_9_during_agent_start_leaves_exactly_one_agent(
        event_log: EventLog, settings: Settings, worker_procs: list[subprocess.Popen[bytes]]) -> None:
    """kill -9 of a worker while provision's agent starts (it runs, but has not reported
    ready): the resumed task ends with exactly one agent for the workspace, started by the
    new claim, the one its result names; nothing of the dead claim is alive."""
    kinds = "tests.events.test_kinds_provision:SLOW_PROVISION"
    ack = await event_log.create(CreateTask("provision", SCOPE, {"name": "crashy", "approve": True}))
    workspace = scope_dir(settings, SCOPE) / "crashy"
    worker_procs.append(_worker(settings, TASKCAST_KINDS=kinds))
    await eventually(lambda: (workspace / STATE_FILE).exists(), within=30)  # started, not yet ready
    dead = await _processes(ack.task, 1)
    (old_fence,) = fences(dead)
    worker_procs[0].send_signal(signal.SIGKILL)
    worker_procs[0].wait(10)
    worker_procs.append(_worker(settings, TASKCAST_KINDS=kinds))
    events = await _until_event(event_log, ack.task, lambda e: e.type in (E.TASK_COMPLETED, E.TASK_FAILED),
                                within=60)
    assert events[-1].type is E.TASK_COMPLETED, events[-1].data
    agent = events[-1].data["result"]["agent"]
    try:
        alive = of_task(ack.task)
        assert [p.pid for p in alive] == [agent["pid"]]  # exactly one process of the task: the agent
        assert old_fence not in fences(alive)
        assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in dead)
        assert await request(agent["address"], "PING") == f"PONG {agent['pid']}"
    finally:
        await stop_agent(workspace)
    await eventually(lambda: of_task(ack.task) == [], within=10)

