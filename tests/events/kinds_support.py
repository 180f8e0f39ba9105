"""What the built-in kinds' tests share: driving a task over the websocket, scopes'
directories, real git repositories made in them, a git server that never answers, and
process lookups (by command line, and by the task-attempt markers of events.attempt)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil

from cli.process import Process
from events import attempt
from events.kinds.proc import gone
from events.kinds.workspace import scope_dirname
from server.settings import Settings
from tests.wsclient import Client

TERMINAL = ("completed", "failed", "cancelled", "timed_out")
TERMINAL_EVENTS = tuple(f"task.{t}" for t in TERMINAL)
GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.com",
           "GIT_COMMITTER_NAME": "Test", "GIT_COMMITTER_EMAIL": "test@example.com", "LC_ALL": "C"}


# tasks


async def create(client: Client, kind: str, input_: dict[str, Any], scope: str = "test",
                 **fields: Any) -> str:
    """Create a task with this socket subscribed to it; its id."""
    ack = await client.request({"type": "create", "kind": kind, "scope": scope, "input": input_,
                                "subscribe": True, **fields})
    assert ack["type"] == "ack", ack
    task: str = ack["task"]
    return task


async def updates_until_end(client: Client, task: str, within: float = 30) -> list[dict[str, Any]]:
    """The updates of `task` up to its terminal event."""
    seen: list[dict[str, Any]] = []

    def end(frame: dict[str, Any]) -> bool:
        if frame["type"] == "update" and frame["event"]["task"] == task:
            seen.append(frame)
            return frame["task"]["status"] in TERMINAL
        return False

    await client.until(end, within)
    return seen


async def run(client: Client, kind: str, input_: dict[str, Any], within: float = 30,
              scope: str = "test") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Create a task and watch it to its end: (its whole last view, from `get`, with the
    step results that update views leave out; its updates)."""
    task = await create(client, kind, input_, scope)
    updates = await updates_until_end(client, task, within)
    return await view(client, task), updates


async def view(client: Client, task: str) -> dict[str, Any]:
    """The task's whole view (`get`)."""
    answer = await client.request({"type": "get", "task": task})
    whole: dict[str, Any] = answer["data"]
    return whole


async def refused(client: Client, kind: str, input_: dict[str, Any], scope: str = "test") -> str:
    """Why a task that must not run was refused: the ack's bad_request (the node runs the
    kind's validate), or else the failure of the task (the worker runs it too)."""
    ack = await client.request({"type": "create", "kind": kind, "scope": scope, "input": input_,
                                "subscribe": True})
    if ack["type"] == "error":
        assert ack["code"] == "bad_request", ack
        message: str = ack["message"]
        return message
    assert ack["type"] == "ack", ack
    view = (await updates_until_end(client, ack["task"]))[-1]["task"]
    assert view["status"] == "failed", view
    error: str = view["error"]
    return error


async def until_event(client: Client, task: str, type_: str, step: str | None = None,
                      within: float = 15) -> dict[str, Any]:
    """The next update of `task` with an event of `type_` (of `step`, if given)."""

    def match(frame: dict[str, Any]) -> bool:
        if frame["type"] != "update" or frame["event"]["task"] != task:
            return False
        event = frame["event"]
        return bool(event["type"] == type_ and (step is None or event["data"].get("step") == step))

    return await client.until(match, within)


async def history(client: Client, task: str) -> list[dict[str, Any]]:
    answer = await client.request({"type": "history", "task": task})
    events: list[dict[str, Any]] = answer["data"]["events"]
    return events


async def terminal_events(client: Client, task: str) -> list[str]:
    return [e["type"] for e in await history(client, task) if e["type"] in TERMINAL_EVENTS]


def output_lines(updates: list[dict[str, Any]]) -> list[str]:
    return [line for u in updates if u["event"]["type"] == "step.output"
            for line in u["event"]["data"]["lines"]]


def started_steps(updates: list[dict[str, Any]]) -> list[str]:
    return [u["event"]["data"]["step"] for u in updates if u["event"]["type"] == "step.started"]


# scopes


def scope_dir(where: Process | Settings, scope: str = "test") -> Path:
    """The directory of `scope` under the workspace root, created (tests put files there)."""
    settings = where.settings if isinstance(where, Process) else where
    path = Path(settings.workspace_root).resolve() / scope_dirname(scope)
    path.mkdir(parents=True, exist_ok=True)
    return path


# git


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, check=True, capture_output=True, text=True)
    return done.stdout.strip()


def new_repo(path: Path) -> Path:
    """A working tree on `main` with one commit, its identity configured (rebases commit)."""
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    configure(path)
    commit(path, "README", "hello\n", "initial")
    return path


def configure(repo: Path) -> None:
    git(repo, "config", "user.name", "Test")
    git(repo, "config", "user.email", "test@example.com")


def commit(repo: Path, file: str, text: str, message: str) -> str:
    (repo / file).parent.mkdir(parents=True, exist_ok=True)
    (repo / file).write_text(text)
    git(repo, "add", file)
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def is_ancestor(repo: Path, a: str, b: str) -> bool:
    return subprocess.run(["git", "merge-base", "--is-ancestor", a, b], cwd=repo, env=GIT_ENV).returncode == 0


def clean_and_idle(repo: Path) -> bool:
    """Nothing to commit and no rebase in progress."""
    gitdir = Path(git(repo, "rev-parse", "--absolute-git-dir"))
    return (git(repo, "status", "--porcelain") == "" and not (gitdir / "rebase-merge").exists()
            and not (gitdir / "rebase-apply").exists())


def stalling_hook(repo: Path, hook: str, pid_file: Path, *, rebasing: str | None = None) -> None:
    """Install a hook that records its pid and then hangs, so git stops half way there
    (with `rebasing`: only while that branch is being rebased)."""
    stall = f"echo $$ > {pid_file}; exec sleep 60"
    if rebasing is not None:
        head_name = repo / ".git" / "rebase-merge" / "head-name"
        stall = f"if grep -qx refs/heads/{rebasing} {head_name} 2>/dev/null; then {stall}; fi"
    script = repo / ".git" / "hooks" / hook
    script.write_text(f"#!/bin/sh\n{stall}\n")
    script.chmod(0o755)


@asynccontextmanager
async def silent_git_server() -> AsyncIterator[str]:
    """A git:// URL whose server accepts connections and never answers (a stalled remote)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(4096):
            pass
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"git://127.0.0.1:{port}/stalled.git"
    finally:
        server.close()
        for writer in held:
            writer.close()
        await server.wait_closed()


# processes


def processes_with(text: str) -> list[int]:
    """Pids of this process's descendants whose command line mentions `text`."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if any(text in part for part in child.cmdline()) and not gone(child.pid):
                found.append(child.pid)
        except psutil.Error:
            continue
    return found


def all_gone(pids: list[int]) -> bool:
    return all(gone(pid) for pid in pids)


def of_task(task: str, fence: int | None = None) -> list[psutil.Process]:
    """The live processes (anywhere on the machine) marked as started for `task` (by the
    claim `fence`, if given): a scan of every process's environment."""
    return attempt.scan(attempt.of_attempt(task, fence))


def fences(processes: list[psutil.Process]) -> set[int]:
    return {int(attempt.environ(p).get(attempt.FENCE, "0")) for p in processes}
