"""The `git.clone` kind, with real git on local repositories: progress, idempotence, cancel."""

from __future__ import annotations

import os
from pathlib import Path

from cli.process import Process
from events.kinds.git import parse_progress
from tests.conftest import Launch, ws_url
from tests.events.kinds_support import (
    all_gone,
    commit,
    create,
    git,
    new_repo,
    output_lines,
    processes_with,
    run,
    scope_dir,
    silent_git_server,
    terminal_events,
    until_event,
    updates_until_end,
)
from tests.waiting import eventually
from tests.wsclient import Client


def _bare_origin(where: Path, files: int = 40, name: str = "origin") -> Path:
    """A bare repository `where/<name>.git` with enough objects for git to show its meters."""
    work = new_repo(where / f"{name}-src")
    for i in range(files):
        commit(work, f"dir/file{i}.txt", os.urandom(2000).hex(), f"file {i}")
    git(where, "clone", "-q", "--bare", str(work), f"{name}.git")
    return where / f"{name}.git"


def test_git_meters_map_to_the_step_progress() -> None:
    """Receiving objects, resolving deltas and rebasing lines become step fractions."""
    assert parse_progress("Receiving objects:  50% (16/32)") == (0.45, "receiving objects 50%")
    assert parse_progress("remote: Counting objects: 100% (3/3), done.") == (0.05, "counting objects 100%")
    assert parse_progress("Resolving deltas: 100% (2/2), done.") == (0.95, "resolving deltas 100%")
    assert parse_progress("Rebasing (2/4)") == (0.25, "rebasing commit 2 of 4")
    assert parse_progress("Cloning into 'x'...") is None
    assert parse_progress("Frobbing things:  10% (1/10)") is None


async def test_clone_streams_progress_and_output_and_completes(taskcast: Process) -> None:
    """A clone reports git's progress and output, and ends with the checkout in `dest`
    (relative to the scope's directory, like the local `url`)."""
    ws = scope_dir(taskcast)
    origin = _bare_origin(ws)
    dest = ws / "clones" / "checkout"
    client = await Client.open(ws_url(taskcast))
    view, updates = await run(client, "git.clone", {"url": "origin.git", "dest": "clones/checkout"})
    assert view["status"] == "completed", view["error"]
    assert view["result"] == {"dest": "clones/checkout", "head": git(origin, "rev-parse", "main"),
                              "branch": "main"}
    assert (dest / "dir" / "file39.txt").is_file() and git(dest, "status", "--porcelain") == ""
    # Progress is coalesced (the latest per flush): a fast clone may show only its end.
    progress = [u["event"]["data"] for u in updates if u["event"]["type"] == "step.progress"]
    assert progress and all(p["message"].split()[0] in ("counting", "compressing", "receiving",
                                                        "resolving", "updating") for p in progress)
    assert [p["progress"] for p in progress] == sorted(p["progress"] for p in progress)
    lines = output_lines(updates)
    assert lines[0].startswith("Cloning into") and any(line.startswith("Receiving objects: 100%")
                                                      for line in lines)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["checkout"]  # no temporary left


async def test_clone_into_an_existing_clone_of_the_url_reports_it(taskcast: Process) -> None:
    """At least once: a second clone to the same place finds the first and completes as is;
    a different repository already there fails the task."""
    ws = scope_dir(taskcast)
    origin = _bare_origin(ws, files=2)
    other_origin = _bare_origin(ws, files=1, name="other")
    client = await Client.open(ws_url(taskcast))
    first, _ = await run(client, "git.clone", {"url": origin.as_uri(), "dest": "checkout"})
    again, _ = await run(client, "git.clone", {"url": origin.as_uri(), "dest": "checkout"})
    assert first["status"] == again["status"] == "completed" and again["result"] == first["result"]
    other, _ = await run(client, "git.clone", {"url": str(other_origin), "dest": "checkout"})
    assert other["status"] == "failed" and "already exists" in other["error"]


async def test_clone_of_a_missing_repository_fails_with_gits_message(taskcast: Process) -> None:
    """git's own message reaches the failed step (retryable: a remote may come back)."""
    client = await Client.open(ws_url(taskcast))
    task = await create(client, "git.clone", {"url": "nope.git", "dest": "d"})
    failed = await until_event(client, task, "step.failed")
    assert "does not exist" in failed["event"]["data"]["error"] and failed["event"]["data"]["retryable"]
    await client.request({"type": "cancel", "task": task})  # no need to sit through the backoff
    await updates_until_end(client, task)


async def test_cancel_during_clone_kills_git_and_removes_the_partial_clone(launch: Launch) -> None:
    """Cancel mid-clone (a remote that never answers): git is killed, the temporary
    directory removed, `dest` never created; cancelled, one terminal event."""
    process = await launch(cancel_grace_s=0.5)
    client = await Client.open(ws_url(process))
    ws = scope_dir(process)
    async with silent_git_server() as url:
        task = await create(client, "git.clone", {"url": url, "dest": "checkout"})
        await until_event(client, task, "step.started", step="clone")
        pids: list[int] = []
        await eventually(lambda: pids.extend(processes_with(url)) or pids)
        await client.request({"type": "cancel", "task": task})
        updates = await updates_until_end(client, task)
    assert updates[-1]["task"]["status"] == "cancelled"
    await eventually(lambda: all_gone(pids), within=5)
    assert list(ws.iterdir()) == []
    assert await terminal_events(client, task) == ["task.cancelled"]
