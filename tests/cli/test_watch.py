"""`taskcast create` and `taskcast watch` as a user runs them, against running servers."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from rich.console import Console

from cli.client import Update
from cli.process import Process
from cli.watch import Board, event_text
from tests.conftest import ws_url
from tests.restarting import Restartable
from tests.waiting import eventually
from tests.wsclient import Client

ROOT = Path(__file__).resolve().parents[2]


class Cli:
    """A `taskcast` subprocess whose output lines are collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, *args: str) -> Cli:
        env = {**os.environ, "COLUMNS": "200"}
        env.pop("TASKCAST_URL", None)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli.main", *args, cwd=ROOT, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.lines.append(line.decode().rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    async def exit_code(self, within: float = 40) -> int:
        try:
            code = await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError("taskcast did not exit:\n" + self.text) from None
        await self.reader
        return code


async def test_create_watch_prints_every_step_and_exits_0(taskcast: Process) -> None:
    """`taskcast create demo --watch` prints each step as it starts and completes, then exits 0."""
    cli = await Cli.start("create", "demo", "--input", json.dumps({"steps": 3, "step_ms": 60}),
                          "--scope", "p:cli", "--watch", "--url", ws_url(taskcast))
    assert await cli.exit_code() == 0, cli.text
    assert cli.lines[0].startswith("created task tsk_")
    for step in ("step_1", "step_2", "step_3"):
        assert sum(f" {step} started" in line for line in cli.lines) == 1, cli.text
        assert sum(f" {step} completed in " in line for line in cli.lines) == 1, cli.text
    assert cli.lines[-1].endswith('completed: {"steps":3}'), cli.text


async def test_create_without_watch_prints_the_task_and_exits(taskcast: Process) -> None:
    """Without --watch, `taskcast create` exits 0 once acked; a bad kind exits 2 with the error."""
    cli = await Cli.start("create", "demo", "--url", ws_url(taskcast))
    assert await cli.exit_code() == 0 and cli.lines[0].startswith("created task tsk_"), cli.text
    cli = await Cli.start("create", "nope", "--url", ws_url(taskcast))
    assert await cli.exit_code() == 2 and "bad_request: unknown kind 'nope'" in cli.text, cli.text


async def test_watch_survives_a_server_restart(server: Restartable) -> None:
    """`taskcast watch TASK` reconnects after a restart, resumes with `since`, prints every
    step completion once, and exits 0 when the task completes."""
    client = await Client.open(server.ws_url)
    ack = await client.request({"type": "create", "kind": "demo", "scope": "p:cli", "subscribe": True,
                                "input": {"steps": 5, "step_ms": 400, "ask_step": 1}})
    # Parked on its question before step 1 until `watch` has subscribed: a watch attaching
    # later shows the steps done so far in its snapshot's view, not as lines (PROTOCOL.md).
    await client.until(lambda f: f["type"] == "update" and f["event"]["type"] == "task.question")
    cli = await Cli.start("watch", ack["task"], "--url", server.ws_url)
    await eventually(lambda: bool(cli.lines) and "waiting_answer" in cli.lines[0], 20)
    await client.request({"type": "answer", "task": ack["task"], "question": "q_1", "answer": "approve"})
    await client.close()
    await eventually(lambda: "step_2 completed" in cli.text, 20)
    await server.restart()
    assert await cli.exit_code() == 0, cli.text
    assert "connection lost" in cli.text and "reconnected" in cli.text, cli.text
    for step in range(1, 6):
        assert sum(f" step_{step} completed in " in line for line in cli.lines) == 1, cli.text
    assert cli.lines[-1].endswith('completed: {"steps":5}'), cli.text


async def test_watch_a_scope_and_of_an_unknown_task(taskcast: Process) -> None:
    """`watch --scope` shows the scope's tasks as they come; an unknown task exits 2."""
    cli = await Cli.start("watch", "--scope", "p:w", "--url", ws_url(taskcast))
    try:
        client = await Client.open(ws_url(taskcast))

        async def create() -> None:
            await client.request({"type": "create", "kind": "demo", "scope": "p:w",
                                  "input": {"steps": 1, "step_ms": 1}})

        await create()  # may land before the subscription: then it is in the snapshot
        await eventually(lambda: "tsk_" in cli.text, 20)
        await create()
        await eventually(lambda: sum("completed: " in line for line in cli.lines) >= 1, 20)
        await client.close()
    finally:
        cli.proc.terminate()
        await cli.exit_code()
    missing = await Cli.start("watch", "tsk_missing", "--url", ws_url(taskcast))
    assert await missing.exit_code() == 2 and "not_found" in missing.text, missing.text


def _update(version: int, type_: str, data: dict[str, object], **view: object) -> Update:
    task = {"id": "tsk_1", "kind": "demo", "scope": "p", "status": "running", "steps": [],
            "progress": 0.5, "questions": [], "version": version, **view}
    return Update("task:tsk_1", f"p{version}", {"task": "tsk_1", "version": version, "type": type_,
                                                "at": "2026-11-21T10:00:01.500Z", "data": data}, task)


def test_event_lines() -> None:
    """Steps, questions and ends each make one readable line; progress makes none."""
    steps = [{"name": "build", "status": "completed", "started_at": "2026-11-21T10:00:00.000Z"}]
    assert event_text(_update(5, "step.completed", {"step": "build"}, steps=steps)) == \
        "build completed in 1.50 s"
    assert event_text(_update(6, "step.progress", {"step": "build", "progress": 0.5})) is None
    assert event_text(_update(7, "task.question", {"question": "q_1", "prompt": "Go?",
                                                   "options": ["approve", "deny"]})) == \
        "? Go? [approve/deny] (question q_1: answer it in the dashboard)"
    assert event_text(_update(8, "task.failed", {"error": "boom"})) == "failed: boom"


def test_the_panel_shows_a_bar_per_step_and_pending_questions() -> None:
    """The live panel lists each step with its state, the steps still planned, and questions."""
    board = Board()
    steps = [{"name": "fetch", "status": "completed", "started_at": "2026-11-21T10:00:00.000Z",
              "ended_at": "2026-11-21T10:00:02.000Z", "progress": 1.0},
             {"name": "build", "status": "running", "progress": 0.4, "message": "compiling"}]
    board.apply(_update(9, "step.progress", {"step": "build", "progress": 0.4}, steps=steps,
                        steps_total=3, questions=[{"id": "q_1", "prompt": "Deploy?", "options": ["yes"]}]))
    console = Console(record=True, width=120, color_system=None)
    console.print(board.render())
    text = console.export_text()
    assert "✔ fetch" in text and "2.00 s" in text and "● build" in text and "compiling" in text
    assert "1 more pending" in text and "Deploy?" in text and "50%" in text
