"""The runtime: timeouts, retries from the failed step, plugins by import path."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cli.process import load_kinds
from events.ids import TaskId, split
from events.kind import KindSpec, TaskContext
from events.kinds import builtin
from events.log import CreateTask, EventLog
from events.model import EventType
from events.queue import Queue
from events.worker import Worker, WorkerConfig
from server.settings import Settings
from tests.conftest import Launch, ws_url
from tests.waiting import cancelled, eventually_async
from tests.wsclient import Client

E = EventType


@pytest.fixture
async def worker(settings: Settings, event_log: EventLog) -> AsyncIterator[Worker]:
    """One in-process worker with a short grace period and fast maintenance."""
    w = Worker(settings.database_url, event_log, builtin(),
               WorkerConfig(cancel_grace_s=0.2, maintain_every_s=0.2))
    running = asyncio.create_task(w.run(), name="worker")
    yield w
    await cancelled(running)


async def _ended(log: EventLog, task: Any, within: float = 20) -> list[Any]:
    events: list[Any] = []

    async def ended() -> bool:
        events[:] = await log.history(task)
        return events[-1].type in (E.TASK_COMPLETED, E.TASK_FAILED, E.TASK_CANCELLED, E.TASK_TIMED_OUT)

    await eventually_async(ended, within=within, poll_s=0.05)
    return events


async def test_a_running_task_past_its_timeout_ends_timed_out(event_log: EventLog, worker: Worker) -> None:
    """timeout_s: the step is aborted and the task ends timed_out, once."""
    ack = await event_log.create(CreateTask("demo", "p", {"steps": 20, "step_ms": 500}, timeout_s=0.7))
    events = await _ended(event_log, ack.task)
    types = [e.type for e in events]
    assert types[-1] is E.TASK_TIMED_OUT and E.TASK_STARTED in types
    assert sum(t in (E.TASK_COMPLETED, E.TASK_FAILED, E.TASK_CANCELLED, E.TASK_TIMED_OUT) for t in types) == 1


async def test_a_task_whose_worker_died_still_times_out(event_log: EventLog, settings: Settings) -> None:
    """A task past its deadline whose worker is gone (lease expired) is timed out by another
    worker's maintenance."""
    ack = await event_log.create(CreateTask("demo", "p", {"steps": 5, "step_ms": 1000}, timeout_s=60))
    (claim,) = await Queue(event_log.pool).claim("ghost", ["demo"], limit=1, lease_s=30)  # then dies
    assert claim.task == ack.task
    async with event_log.pool.acquire() as conn:  # an hour later: deadline and lease are past
        await conn.execute("UPDATE tasks SET view = jsonb_set(view, '{deadline_from}', "
                           "to_jsonb((now() - interval '1 hour')::text))")
        await conn.execute("UPDATE jobs SET lease_expires_at = now() - interval '1 hour'")
    survivor = Worker(settings.database_url, event_log, builtin(), WorkerConfig(maintain_every_s=0.2))
    await survivor.maintain()
    events = await event_log.history(ack.task)
    assert [e.type for e in events] == [E.TASK_CREATED, E.TASK_STARTED, E.TASK_TIMED_OUT]


async def test_a_retryable_step_failure_retries_from_that_step(event_log: EventLog, worker: Worker) -> None:
    """fail_step 2 fails once (retryable): task.retrying, then the run resumes at step 2
    (step 1 is a checkpoint) and completes."""
    ack = await event_log.create(CreateTask("demo", "p", {"steps": 3, "step_ms": 1, "fail_step": 2}))
    events = await _ended(event_log, ack.task, within=30)
    types = [e.type for e in events]
    assert types[-1] is E.TASK_COMPLETED
    assert types.count(E.STEP_FAILED) == 1 and types.count(E.TASK_RETRYING) == 1
    started = [e.data["step"] for e in events if e.type is E.STEP_STARTED]
    assert started == ["step_1", "step_2", "step_2", "step_3"]
    retrying = next(e for e in events if e.type is E.TASK_RETRYING)
    assert retrying.data["attempt"] == 2 and retrying.data["delay_s"] >= 0 and retrying.data["reason"]


async def test_a_plugin_kind_registered_by_import_path_runs(tmp_path: Path, launch: Launch,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """TASKCAST_KINDS=package.module:attr registers a user's kind with the same API."""
    (tmp_path / "my_kinds.py").write_text(
        "from events.kinds import KindSpec\n"
        "async def greet(ctx):\n"
        "    async def hello():\n"
        "        ctx.output(['hello ' + ctx.input['name']])\n"
        "        return 'said'\n"
        "    return await ctx.step('hello', hello)\n"
        "GREET = KindSpec('greet', greet)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "greet" in load_kinds(["my_kinds:GREET"])
    process = await launch(kinds=("my_kinds:GREET",))
    client = await Client.open(ws_url(process))
    ack = await client.request({"type": "create", "kind": "greet", "scope": "p", "subscribe": True,
                                "input": {"name": "ada"}})
    done = await client.until(lambda f: f["type"] == "update" and f["event"]["type"] == "task.completed")
    assert done["task"]["result"] == "said" and done["task"]["output_tail"] == ["hello ada"]
    assert ack["type"] == "ack"
    sys.modules.pop("my_kinds", None)


async def test_a_tasks_last_step_completes_in_the_commit_of_its_end(event_log: EventLog,
                                                                   worker: Worker) -> None:
    """A one-step task takes one commit for its step's start and end and its terminal event
    together, after the claim's: two transactions per task, every event still there."""
    ack = await event_log.create(CreateTask("demo", "p", {"steps": 1, "step_ms": 0}))
    events = await _ended(event_log, ack.task)
    xids = {e.type: split(e.position)[0] for e in events}
    assert [e.type for e in events] == [E.TASK_CREATED, E.TASK_STARTED, E.STEP_STARTED, E.STEP_PROGRESS,
                                        E.STEP_COMPLETED, E.TASK_COMPLETED]
    assert xids[E.STEP_STARTED] == xids[E.STEP_COMPLETED] == xids[E.TASK_COMPLETED] != xids[E.TASK_STARTED]


async def test_a_step_runs_only_once_its_predecessors_completion_is_committed(
        settings: Settings, event_log: EventLog) -> None:
    """Invariant 5 with deferred completions: when step two begins, step one's
    step.completed is already in the log (a run that died in step two would skip step one)."""
    seen: list[list[Any]] = []

    async def run(ctx: TaskContext) -> Any:
        async def one() -> str:
            return "done"

        async def two() -> None:
            seen.append([(e.type, e.data.get("step")) for e in await event_log.history(TaskId(ctx.task))])

        assert await ctx.step("one", one) == "done"
        assert ctx.completed("one") and ctx.result_of("one") == "done"  # seen before its commit
        await ctx.step("two", two)
        return None

    w = Worker(settings.database_url, event_log, {"probe": KindSpec("probe", run)},
               WorkerConfig(maintain_every_s=0.2))
    running = asyncio.create_task(w.run(), name="worker")
    try:
        ack = await event_log.create(CreateTask("probe", "p", {}))
        events = await _ended(event_log, ack.task)
    finally:
        await cancelled(running)
    assert events[-1].type is E.TASK_COMPLETED
    (history,) = seen
    assert (E.STEP_COMPLETED, "one") in history and (E.STEP_STARTED, "two") in history
