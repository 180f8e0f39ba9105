"""The `provision` kind: a workspace, a real agent process, a session; approval; cancel."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import psutil
import pytest

from cli.process import Process
from events.kinds import sandbox
from events.kinds.agent import STATE_FILE
from events.kinds.proc import gone, wait_gone
from events.kinds.provision import ensure_agent, make_provision, request, stop_agent
from server.settings import Settings
from tests.conftest import Launch, ws_url
from tests.events.kinds_support import (
    create,
    run,
    scope_dir,
    started_steps,
    terminal_events,
    until_event,
    updates_until_end,
    view,
)
from tests.waiting import eventually
from tests.wsclient import Client

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
# The real agent, slow to report ready once it has started (its state file written): a
# worker killed in that moment leaves a live agent that nobody was told of.
_SLOW_AGENT = """
import os, sys, time
from events.kinds import agent
write = os.write
def slow(fd, data):
    if data.startswith(b'{"pid"'):
        time.sleep(3)
    return write(fd, data)
agent.os.write = slow
sys.exit(agent.main())
"""
SLOW_PROVISION = make_provision(agent=(sys.executable, "-c", _SLOW_AGENT))
# The real agent, which also reads files and opens connections for the test (READ, CONNECT):
# what it can reach is what the sandbox lets it see.
_PEEKING_AGENT = """
import socket, sys
from events.kinds import agent
answer = agent.Agent.answer
async def peek(self, line):
    command, _, arg = line.strip().partition(" ")
    if command == "READ":
        try:
            with open(arg) as f:
                return "DATA " + f.read().strip()
        except OSError as exc:
            return "ERR " + type(exc).__name__
    if command == "CONNECT":
        host, _, port = arg.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return "OK"
        except OSError as exc:
            return "ERR " + type(exc).__name__
    return await answer(self, line)
agent.Agent.answer = peek
sys.exit(agent.main())
"""
PEEKING_PROVISION = make_provision(agent=(sys.executable, "-c", _PEEKING_AGENT))
UNSANDBOXED_PROVISION = make_provision(agent=(sys.executable, "-c", _PEEKING_AGENT), sandboxed=False)
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
    last = updates[-1]["task"]
    try:
        assert last["status"] == "completed" and last["result"]["name"] == "ok-then"
    finally:
        await stop_agent(scope_dir(taskcast) / "ok-then")


async def test_cancel_during_create_session_stops_the_agent(launch: Launch) -> None:
    """Cancel while the session opens: cleanup stops the agent; cancelled, one terminal event."""
    process = await launch(cancel_grace_s=0.5, kinds=(f"{__name__}:STALLED_PROVISION",))
    client = await Client.open(ws_url(process))
    task = await create(client, "provision", {"name": "to-cancel", "approve": True})
    await until_event(client, task, "step.started", step="create_session")
    agent = next(s["result"] for s in (await view(client, task))["steps"] if s["name"] == "ensure_agent")
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
    await until_event(client, task, "step.started", step="create_session")
    agent = next(s["result"] for s in (await view(client, task))["steps"] if s["name"] == "ensure_agent")
    updates = await updates_until_end(client, task)
    last = updates[-1]["task"]
    assert last["status"] == "failed" and "refused a session" in last["error"] and last["attempt"] == 3
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


async def _secrets(settings: Settings, tmp_path: Path) -> list[Path]:
    """Files the agent of workspace `test/peeker` must not see: another workspace of its
    scope, another scope's, and one in the worker's /tmp."""
    files = [scope_dir(settings) / "other-ws" / "secret.txt",
             scope_dir(settings, "bob") / "ws" / "secret.txt", tmp_path / "worker-secret.txt"]
    for file in files:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text("secret")
    return files


async def test_the_sandboxed_agent_sees_only_its_own_workspace(launch: Launch, settings: Settings,
                                                              tmp_path: Path) -> None:
    """Under bubblewrap the agent reads its own workspace, but no file of another workspace
    (of its scope or another), nothing of the worker's /tmp, and has no network; the
    task's output and result say it is sandboxed."""
    if not await sandbox.available():
        pytest.skip("bwrap is not available or cannot make namespaces here (apt-get install bubblewrap)")
    hidden = await _secrets(settings, tmp_path)
    listener = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    process = await launch(kinds=(f"{__name__}:PEEKING_PROVISION",))
    client = await Client.open(ws_url(process))
    view, _ = await run(client, "provision", {"name": "peeker", "approve": True})
    assert view["status"] == "completed", view["error"]
    assert view["result"]["sandbox"] == "bubblewrap"
    assert any(line.startswith("sandbox: bubblewrap") for line in view["output_tail"])
    directory = scope_dir(settings) / "peeker"
    (directory / "mine.txt").write_text("mine")
    address = view["result"]["agent"]["address"]
    try:
        assert await request(address, f"READ {directory / 'mine.txt'}") == "DATA mine"
        for file in hidden:
            assert (await request(address, f"READ {file}")).startswith("ERR "), file
        assert (await request(address, f"CONNECT 127.0.0.1:{port}")).startswith("ERR ")
    finally:
        await stop_agent(directory)
        listener.close()
        await listener.wait_closed()


async def test_without_a_sandbox_the_task_says_so(launch: Launch, settings: Settings, tmp_path: Path) -> None:
    """Where bwrap cannot be used the agent runs in the plain directory, and the task's
    output and result say so (there, it could read the other workspace: that is the point)."""
    hidden = await _secrets(settings, tmp_path)
    process = await launch(kinds=(f"{__name__}:UNSANDBOXED_PROVISION",))
    client = await Client.open(ws_url(process))
    view, _ = await run(client, "provision", {"name": "peeker", "approve": True})
    assert view["status"] == "completed", view["error"]
    assert view["result"]["sandbox"] == "directory"
    assert any(line.startswith("sandbox: none") for line in view["output_tail"])
    try:
        assert await request(view["result"]["agent"]["address"], f"READ {hidden[1]}") == "DATA secret"
    finally:
        await stop_agent(scope_dir(settings) / "peeker")


async def test_two_agents_started_at_once_for_one_workspace_make_one(tmp_path: Path) -> None:
    """One agent per workspace: two starts racing (no state file yet) both get the same
    agent; the second one started finds the workspace's lock taken and exits."""
    never = asyncio.Event()
    first, second = await asyncio.gather(ensure_agent(tmp_path, never), ensure_agent(tmp_path, never))
    try:
        assert first == second and not gone(first["pid"])
        agents = [p for p in psutil.process_iter(["cmdline"])
                  if str(tmp_path) in (p.info["cmdline"] or []) and not gone(p.pid)]
        assert [p.pid for p in agents] == [first["pid"]]
    finally:
        await stop_agent(tmp_path)
    assert gone(first["pid"])
