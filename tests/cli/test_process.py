"""A process's lifecycle as an operator sees it: deploys drain without stalls, a failed
start leaks nothing, a stop always ends."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from cli.process import Process, Roles
from events.ids import TaskId
from events.kinds import KindSpec
from events.log import CreateTask, EventLog
from events.model import EventType
from server.settings import Settings
from tests.waiting import eventually, eventually_async, free_port

E = EventType


@pytest.fixture
def worker_procs(settings: Settings, tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`taskcast worker` processes with a 30 s lease and a short drain grace."""
    env = {**os.environ, "DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url,
           "TASKCAST_CHANNEL": settings.channel,
           "TASKCAST_WORKSPACE_ROOT": settings.workspace_root, "TASKCAST_LEASE_S": "30",
           "TASKCAST_DRAIN_GRACE_S": "0.3", "TASKCAST_LOG": "INFO"}
    procs = []
    for i in range(2):
        with (tmp_path / f"worker-{i}.log").open("wb") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "cli.main", "worker"], env=env,
                                          stdout=out, stderr=subprocess.STDOUT))
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def test_sigterm_mid_step_hands_the_task_to_another_worker_at_once(
        event_log: EventLog, worker_procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to the worker running a task: it drains and hands the task back, and the
    idle worker resumes it within 2 s (the lease is 30 s); every completed step ran once."""
    ack = await event_log.create(CreateTask(kind="demo", scope="p", input={"steps": 4, "step_ms": 1200}))
    events: list[Any] = []

    async def seen(match: Any) -> bool:
        events[:] = await event_log.history(TaskId(ack.task))
        return any(match(e) for e in events)

    await eventually_async(lambda: seen(lambda e: e.type is E.STEP_STARTED and e.data["step"] == "step_2"),
                           within=30, poll_s=0.05)
    first = next(e.data["worker"] for e in events if e.type is E.STEP_STARTED)
    pid = int(first.split(":")[1])
    running = next(p for p in worker_procs if p.pid == pid)
    signalled = time.monotonic()
    running.send_signal(signal.SIGTERM)
    await eventually_async(lambda: seen(lambda e: e.type is E.STEP_STARTED and e.data["worker"] != first),
                           within=2, poll_s=0.02)
    assert time.monotonic() - signalled < 2
    await eventually_async(lambda: seen(lambda e: e.type is E.TASK_COMPLETED), within=30, poll_s=0.1)
    assert running.wait(10) == 0
    completed = [e.data["step"] for e in events if e.type is E.STEP_COMPLETED]
    assert completed == ["step_1", "step_2", "step_3", "step_4"], completed


async def _connections(database_url: str) -> int:
    name = database_url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", name))
    finally:
        await conn.close()


@pytest.mark.parametrize("setting", ["port", "relay_metrics_port", "worker_metrics_port"])
async def test_a_start_on_a_port_in_use_leaves_no_task_and_no_connection(settings: Settings,
                                                                         setting: str) -> None:
    """The node's port, or a metrics port, is taken: the start raises, and everything it
    had started (pool, Redis, waker, relay, workers, the node's loops) is stopped again."""
    before = set(asyncio.all_tasks())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            await Process(settings.with_(**{setting: port}),
                          Roles(serve=True, relay=True, workers=2)).__aenter__()
    assert set(asyncio.all_tasks()) - before == set()

    async def released() -> bool:
        return await _connections(settings.database_url) == 0

    await eventually_async(released, within=10)


RELEASE = asyncio.Event()


async def _stubborn(ctx: Any) -> None:
    """A kind that swallows every cancellation until RELEASE is set."""
    async def forever() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if RELEASE.is_set():
                    raise

    await ctx.step("stuck", forever)


STUBBORN = KindSpec("stubborn", _stubborn)


async def test_a_stop_with_a_stuck_task_ends_within_its_time_box(settings: Settings) -> None:
    """A task that ignores cancellation cannot hold a stop: each stage gives up after its
    time box and the stop returns."""
    s = settings.with_(kinds=(f"{__name__}:STUBBORN",), drain_grace_s=0.2, stop_timeout_s=1.0)
    process = Process(s, Roles(serve=True, relay=True, workers=1))
    await process.__aenter__()
    ack = await process.log.create(CreateTask(kind="stubborn", scope="p"))

    async def stuck() -> bool:
        return any(e.type is E.STEP_STARTED for e in await process.log.history(ack.task))

    await eventually_async(stuck, within=15)
    started = time.monotonic()
    await asyncio.wait_for(process.stop(), 20)
    assert time.monotonic() - started < 8
    RELEASE.set()
    leftovers = [t for t in asyncio.all_tasks() if t.get_name() == f"run {ack.task}"]
    for task in leftovers:
        task.cancel()
    await eventually(lambda: all(t.done() for t in leftovers), within=5)


def test_a_migrate_that_cannot_reach_postgresql_says_so_in_one_line_and_exits_1() -> None:
    """`taskcast migrate` against a PostgreSQL that is not there names the outage on one
    line (no traceback) and exits 1, so a deploy script stops there."""
    env = {**os.environ, "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/none",
           "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "TASKCAST_LOG": "WARNING"}
    done = subprocess.run([sys.executable, "-m", "cli.main", "migrate"], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("taskcast migrate: PostgreSQL is unavailable")
