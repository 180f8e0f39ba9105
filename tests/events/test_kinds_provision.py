"""The `provision` kind: a workspace, a real agent process, a session; approval; cancel."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from events.kinds.agent import STATE_FILE
from events.kinds.proc import gone, wait_gone
from events.kinds.provision import ensure_agent, make_provision, request, stop_agent
from server.process import Process
from tests.conftest import ws_url
from tests.events.kinds_support import (
    create,
    run,
    scope_dir,
    started_steps,
    terminal_events,
    until_event,
    updates_until_end,
)
from tests.waiting import eventually
from tests.wsclient import Client

Launch = Callable[..., Awaitable[Process]]

# The real agent, except that it never answers OPEN: provisioning hangs in create_session.
_STALLED_AGENT = """
import asyncio, sys
from events.kinds import agent
answer = agent.Agent.answer
async def stalled(self, line):
    if line.startswith("OPEN"):
        await asyncio.sleep(3600)
    return await answer(self, line)
agent.Agent.answer = stalled
sys.exit(agent.main())
"""
STALLED_PROVISION = make_provision(agent=(sys.executable, "-c", _STALLED_AGENT))
# The real agent, except that it refuses every session.
_REFUSING_AGENT = _STALLED_AGENT.replace("await asyncio.sleep(3600)", 'return "ERR no sessions here"')
REFUSING_PROVISION = make_provision(agent=(sys.executable, "-c", _REFUSING_AGENT))


async def test_provision_names_a_workspace_starts_an_agent_and_opens_a_session(taskcast: Process) -> None:
    """provision completes once the session is open; the agent keeps running and owns it."""
    client = await Client.open(ws_url(taskcast))
    view, updates = await run(client, "provision", {"root": "ws", "approve": True})
    assert view["status"] == "completed", view["error"]
    assert started_steps(updates) == ["ensure_name", "create_sandbox", "ensure_agent", "create_session"]
    result = view["result"]
    assert re.fullmatch(r"[a-z]+-[a-z]+", result["name"]) and result["dir"] == f"ws/{result['name']}"
    agent = result["agent"]
    directory = scope_dir(taskcast) / result["dir"]
    try:
        assert directory.is_dir() and not gone(agent["pid"])
        assert await request(agent["address"], "PING") == f"PONG {agent['pid']}"
        assert await request(agent["address"], f"OPEN {view['id']}") == f"SESSION {result['session']}"
        assert view["progress"] == 1.0 and await terminal_events(client, view["id"]) == ["task.completed"]
    finally:
        await stop_agent(directory)
    assert gone(agent["pid"]) and not (directory / STATE_FILE).exists()


async def test_provision_asks_approval_and_a_deny_fails_leaving_nothing(taskcast: Process) -> None:
    """One command_approval question comes before anything is created; deny fails the task."""
    client = await Client.open(ws_url(taskcast))
    ws = scope_dir(taskcast)
    task = await create(client, "provision", {"root": "ws", "name": "deny-me"})
    asked = await until_event(client, task, "task.question")
    question = asked["event"]["data"]
    assert question["type"] == "command_approval" and question["options"] == ["approve", "deny"]
    assert "ws/deny-me" in question["prompt"] and asked["task"]["status"] == "waiting_answer"
    await client.request({"type": "answer", "task": task, "question": question["question"], "answer": "deny"})
    updates = await updates_until_end(client, task)
    assert updates[-1]["task"]["status"] == "failed" and "denied" in updates[-1]["task"]["error"]
    assert list(ws.iterdir()) == []


async def test_provision_runs_on_once_approved(taskcast: Process) -> None:
    """An approve answer resumes the task: it provisions the named workspace and completes."""
    client = await Client.open(ws_url(taskcast))
    task = await create(client, "provision", {"name": "ok-then"})
    asked = await until_event(client, task, "task.question")
    await client.request({"type": "answer", "task": task, "question": asked["event"]["data"]["question"],
                          "answer": "approve"})
    updates = await updates_until_end(client, task)
    view = updates[-1]["task"]
    try:
        assert view["status"] == "completed" and view["result"]["name"] == "ok-then"
    finally:
        await stop_agent(scope_dir(taskcast) / "ok-then")


async def test_cancel_during_create_session_stops_the_agent(launch: Launch) -> None:
    """Cancel while the session opens: cleanup stops the agent; cancelled, one terminal event."""
    process = await launch(cancel_grace_s=0.5, kinds=(f"{__name__}:STALLED_PROVISION",))
    client = await Client.open(ws_url(process))
    task = await create(client, "provision", {"name": "to-cancel", "approve": True})
    started = await until_event(client, task, "step.started", step="create_session")
    agent = next(s["result"] for s in started["task"]["steps"] if s["name"] == "ensure_agent")
    assert not gone(agent["pid"])
    await client.request({"type": "cancel", "task": task})
    updates = await updates_until_end(client, task)
    assert updates[-1]["task"]["status"] == "cancelled"
    await eventually(lambda: gone(agent["pid"]), within=5)
    assert not (scope_dir(process) / "to-cancel" / STATE_FILE).exists()
    assert await terminal_events(client, task) == ["task.cancelled"]


async def test_a_provision_that_ends_failed_stops_its_agent(launch: Launch) -> None:
    """An agent does not outlive a failed run: after the last attempt, it is stopped."""
    process = await launch(kinds=(f"{__name__}:REFUSING_PROVISION",))
    client = await Client.open(ws_url(process))
    task = await create(client, "provision", {"name": "refused", "approve": True})
    started = await until_event(client, task, "step.started", step="create_session")
    agent = next(s["result"] for s in started["task"]["steps"] if s["name"] == "ensure_agent")
    updates = await updates_until_end(client, task)
    view = updates[-1]["task"]
    assert view["status"] == "failed" and "refused a session" in view["error"] and view["attempt"] == 3
    await eventually(lambda: gone(agent["pid"]), within=5)


async def test_ensure_agent_reuses_a_live_agent_and_replaces_a_dead_one(tmp_path: Path) -> None:
    """At least once per step: a second ensure_agent finds the running agent; a dead one is replaced."""
    never = asyncio.Event()
    first = await ensure_agent(tmp_path, never)
    try:
        assert await ensure_agent(tmp_path, never) == first
        os.kill(first["pid"], signal.SIGKILL)
        assert await wait_gone(first["pid"], 5)
        second = await ensure_agent(tmp_path, never)
        assert second["pid"] != first["pid"] and not gone(second["pid"])
    finally:
        await stop_agent(tmp_path)
    assert gone(second["pid"])


async def test_an_agent_stops_when_its_workspace_is_removed(tmp_path: Path) -> None:
    """No agent outlives its workspace: removing the directory stops it."""
    workspace = tmp_path / "gone-soon"
    workspace.mkdir()
    agent = await ensure_agent(workspace, asyncio.Event())
    for file in workspace.iterdir():
        file.unlink()
    workspace.rmdir()
    assert await wait_gone(agent["pid"], 5)
