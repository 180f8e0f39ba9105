"""The `repo.*` kinds on real local repositories: sync, rebase, restack, register; conflicts
leave the repository clean; cancel aborts; one action per repository at a time."""

from __future__ import annotations

from pathlib import Path

from cli.process import Process
from server.settings import Settings
from tests.conftest import Launch, ws_url
from tests.events.kinds_support import (
    all_gone,
    clean_and_idle,
    commit,
    configure,
    create,
    git,
    history,
    is_ancestor,
    new_repo,
    processes_with,
    run,
    scope_dir,
    silent_git_server,
    stalling_hook,
    started_steps,
    terminal_events,
    updates_until_end,
)
from tests.waiting import eventually, eventually_async
from tests.wsclient import Client


def _rebase_feature(repo: Path) -> dict[str, str]:
    return {"repo": repo.name, "branch": "feature", "onto": "main"}


def _origin_and_clone(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(bare origin, our working clone, another clone that pushes to origin)."""
    new_repo(tmp_path / "seed")
    git(tmp_path, "clone", "-q", "--bare", str(tmp_path / "seed"), "origin.git")
    clones = []
    for name in ("work", "other"):
        git(tmp_path, "clone", "-q", str(tmp_path / "origin.git"), name)
        configure(tmp_path / name)
        clones.append(tmp_path / name)
    return tmp_path / "origin.git", clones[0], clones[1]


def _stack(repo: Path, *branches: str) -> None:
    """Branches each one commit above the previous, starting from main."""
    parent = "main"
    for branch in branches:
        git(repo, "checkout", "-q", "-b", branch, parent)
        commit(repo, f"{branch}.txt", f"{branch}\n", f"add {branch}")
        parent = branch
    git(repo, "checkout", "-q", "main")


async def test_sync_fetches_and_fast_forwards(taskcast: Process,
        settings: Settings) -> None:
    """repo.sync brings the checked-out branch up to its remote's."""
    ws = scope_dir(settings)
    _, work, other = _origin_and_clone(ws)
    before = git(work, "rev-parse", "HEAD")
    pushed = commit(other, "new.txt", "new\n", "upstream change")
    git(other, "push", "-q", "origin", "main")
    client = await Client.open(ws_url(taskcast))
    view, updates = await run(client, "repo.sync", {"repo": work.name})
    assert view["status"] == "completed", view["error"]
    assert view["result"] == {"branch": "main", "before": before, "after": pushed, "fast_forwarded": True}
    assert started_steps(updates) == ["fetch", "fast_forward"]
    assert git(work, "rev-parse", "HEAD") == pushed and clean_and_idle(work)
    again, _ = await run(client, "repo.sync", {"repo": work.name})
    assert again["result"]["fast_forwarded"] is False and again["result"]["after"] == pushed


async def test_sync_of_a_diverged_branch_fails_and_changes_nothing(taskcast: Process,
        settings: Settings) -> None:
    """A branch that is not a fast-forward of its remote's is left alone; the task fails."""
    ws = scope_dir(settings)
    _, work, other = _origin_and_clone(ws)
    commit(other, "theirs.txt", "theirs\n", "theirs")
    git(other, "push", "-q", "origin", "main")
    ours = commit(work, "ours.txt", "ours\n", "ours")
    client = await Client.open(ws_url(taskcast))
    view, _ = await run(client, "repo.sync", {"repo": work.name})
    assert view["status"] == "failed" and "diverged" in view["error"]
    assert git(work, "rev-parse", "HEAD") == ours


async def test_rebase_branch_onto_a_moved_base(taskcast: Process,
        settings: Settings) -> None:
    """repo.rebase_branch replays the branch on its new base and restores the checkout."""
    ws = scope_dir(settings)
    repo = new_repo(ws / "repo")
    _stack(repo, "feature")
    moved = commit(repo, "main.txt", "main\n", "main moves")
    old = git(repo, "rev-parse", "feature")
    client = await Client.open(ws_url(taskcast))
    view, _ = await run(client, "repo.rebase_branch", _rebase_feature(repo))
    assert view["status"] == "completed", view["error"]
    new = git(repo, "rev-parse", "feature")
    assert view["result"] == {"branch": "feature", "onto": "main", "before": old, "after": new}
    assert git(repo, "rev-parse", "feature~1") == moved
    assert git(repo, "symbolic-ref", "--short", "HEAD") == "main" and clean_and_idle(repo)


async def test_a_rebase_conflict_fails_naming_the_files_and_leaves_the_repo_clean(
        taskcast: Process, settings: Settings) -> None:
    """A conflict fails the task with the conflicting files listed; the rebase is aborted,
    the branch unchanged, the checkout restored, nothing left to commit."""
    ws = scope_dir(settings)
    repo = new_repo(ws / "repo")
    git(repo, "checkout", "-q", "-b", "feature")
    commit(repo, "a.txt", "feature a\n", "a on feature")
    commit(repo, "sub/b.txt", "feature b\n", "b on feature")
    git(repo, "checkout", "-q", "main")
    commit(repo, "a.txt", "main a\n", "a on main")
    commit(repo, "sub/b.txt", "main b\n", "b on main")
    old = git(repo, "rev-parse", "feature")
    client = await Client.open(ws_url(taskcast))
    view, _ = await run(client, "repo.rebase_branch", _rebase_feature(repo))
    assert view["status"] == "failed" and view["attempt"] == 1
    assert "conflicts in: a.txt" in view["error"]
    failed = next(s for s in view["steps"] if s["name"] == "rebase")
    assert failed["status"] == "failed" and "a.txt" in failed["error"]
    assert clean_and_idle(repo) and git(repo, "rev-parse", "feature") == old
    assert git(repo, "symbolic-ref", "--short", "HEAD") == "main"
    assert not (repo / ".git" / "taskcast-rebase.json").exists()


async def test_restack_rebases_a_three_branch_stack_in_order(taskcast: Process,
        settings: Settings) -> None:
    """repo.restack puts b1 on main, b2 on the new b1, b3 on the new b2, one step each."""
    ws = scope_dir(settings)
    repo = new_repo(ws / "repo")
    _stack(repo, "b1", "b2", "b3")
    commit(repo, "main.txt", "main\n", "main moves")
    client = await Client.open(ws_url(taskcast))
    view, updates = await run(client, "repo.restack", {"repo": repo.name, "stack": ["b1", "b2", "b3"]})
    assert view["status"] == "completed", view["error"]
    assert started_steps(updates) == ["plan", "rebase b1", "rebase b2", "rebase b3"]
    for parent, branch in (("main", "b1"), ("b1", "b2"), ("b2", "b3")):
        assert git(repo, "rev-parse", f"{branch}~1") == git(repo, "rev-parse", parent)
    assert git(repo, "rev-list", "--count", "main..b3") == "3"  # no commit replayed twice
    assert [b["branch"] for b in view["result"]["branches"]] == ["b1", "b2", "b3"]
    assert clean_and_idle(repo) and git(repo, "symbolic-ref", "--short", "HEAD") == "main"


async def test_registered_parents_make_the_stack_to_restack(taskcast: Process,
        settings: Settings) -> None:
    """repo.register_branch records each parent in git config; restack of the top follows them."""
    ws = scope_dir(settings)
    repo = new_repo(ws / "repo")
    _stack(repo, "b1", "b2", "b3")
    commit(repo, "main.txt", "main\n", "main moves")
    client = await Client.open(ws_url(taskcast))
    for branch, parent in (("b1", "main"), ("b2", "b1"), ("b3", "b2")):
        view, _ = await run(client, "repo.register_branch", {"repo": repo.name, "branch": branch,
                                                             "parent": parent})
        assert view["status"] == "completed" and view["result"] == {"branch": branch, "parent": parent}
        assert git(repo, "config", f"branch.{branch}.taskcast-parent") == parent
    cycle, _ = await run(client, "repo.register_branch", {"repo": repo.name, "branch": "b1", "parent": "b3"})
    assert cycle["status"] == "failed" and "cycle" in cycle["error"]
    view, _ = await run(client, "repo.restack", {"repo": repo.name, "branch": "b3"})
    assert view["status"] == "completed", view["error"]
    assert next(s for s in view["steps"] if s["name"] == "plan")["result"] == {"stack": ["b1", "b2", "b3"],
                                                                                "base": "main"}
    assert is_ancestor(repo, "main", "b1") and is_ancestor(repo, "b1", "b2") and is_ancestor(repo, "b2", "b3")


async def test_cancel_mid_rebase_aborts_it_and_kills_git(launch: Launch, tmp_path: Path,
        settings: Settings) -> None:
    """Cancel while git is half way through a rebase: git and its hook are killed, the
    rebase aborted, the branch and checkout as before; cancelled, one terminal event."""
    ws = scope_dir(settings)
    repo = new_repo(ws / "repo")
    git(repo, "checkout", "-q", "-b", "feature")
    commit(repo, "one.txt", "1\n", "one")
    commit(repo, "two.txt", "2\n", "two")
    git(repo, "checkout", "-q", "main")
    commit(repo, "main.txt", "main\n", "main moves")
    old = git(repo, "rev-parse", "feature")
    hook_pid = tmp_path / "hook.pid"
    stalling_hook(repo, "post-commit", hook_pid)  # runs after the first commit is replayed
    process = await launch(cancel_grace_s=0.5)
    client = await Client.open(ws_url(process))
    task = await create(client, "repo.rebase_branch", _rebase_feature(repo))
    await eventually(lambda: hook_pid.exists() and hook_pid.read_text().strip())
    pids = [int(hook_pid.read_text()), *processes_with("rebase")]
    assert not clean_and_idle(repo)  # really half way
    await client.request({"type": "cancel", "task": task})
    updates = await updates_until_end(client, task)
    assert updates[-1]["task"]["status"] == "cancelled"
    await eventually(lambda: all_gone(pids), within=5)
    assert clean_and_idle(repo) and git(repo, "rev-parse", "feature") == old
    assert git(repo, "symbolic-ref", "--short", "HEAD") == "main"
    assert await terminal_events(client, task) == ["task.cancelled"]


async def test_cancel_mid_restack_keeps_the_finished_branches(launch: Launch, tmp_path: Path,
        settings: Settings) -> None:
    """Cancel during the second branch of a restack: the first stays rebased (a checkpoint),
    the second is as before, the repository clean; cancelled, one terminal event."""
    ws = scope_dir(settings)
    repo = new_repo(ws / "repo")
    _stack(repo, "b1", "b2")
    commit(repo, "main.txt", "main\n", "main moves")
    b2 = git(repo, "rev-parse", "b2")
    hook_pid = tmp_path / "hook.pid"
    stalling_hook(repo, "post-commit", hook_pid, rebasing="b2")
    process = await launch(cancel_grace_s=0.5)
    client = await Client.open(ws_url(process))
    task = await create(client, "repo.restack", {"repo": repo.name, "stack": ["b1", "b2"]})
    await eventually(lambda: hook_pid.exists() and hook_pid.read_text().strip())
    pid = int(hook_pid.read_text())
    await client.request({"type": "cancel", "task": task})
    updates = await updates_until_end(client, task)
    view = updates[-1]["task"]
    assert view["status"] == "cancelled"
    assert [(s["name"], s["status"]) for s in view["steps"]][:2] == [("plan", "completed"),
                                                                     ("rebase b1", "completed")]
    await eventually(lambda: all_gone([pid]), within=5)
    assert clean_and_idle(repo) and git(repo, "rev-parse", "b2") == b2
    assert git(repo, "rev-parse", "b1~1") == git(repo, "rev-parse", "main")
    assert await terminal_events(client, task) == ["task.cancelled"]


async def test_cancel_during_sync_kills_the_fetch(launch: Launch, settings: Settings) -> None:
    """Cancel while fetching from a remote that never answers: git is killed; cancelled."""
    ws = scope_dir(settings)
    _, work, _ = _origin_and_clone(ws)
    process = await launch(cancel_grace_s=0.5)
    client = await Client.open(ws_url(process))
    async with silent_git_server() as url:
        git(work, "remote", "set-url", "origin", url)
        task = await create(client, "repo.sync", {"repo": work.name})
        pids: list[int] = []
        await eventually(lambda: pids.extend(processes_with("fetch")) or pids)
        await client.request({"type": "cancel", "task": task})
        updates = await updates_until_end(client, task)
    assert updates[-1]["task"]["status"] == "cancelled"
    await eventually(lambda: all_gone(pids), within=5)
    assert await terminal_events(client, task) == ["task.cancelled"]


async def test_actions_on_one_repository_run_one_at_a_time(launch: Launch, tmp_path: Path,
        settings: Settings) -> None:
    """A second action on a repository waits for the first to end (the worker's lock on the
    repository), even with a free worker; one on another repository does not."""
    ws = scope_dir(settings)
    repo = new_repo(ws / "repo")
    _stack(repo, "feature")
    commit(repo, "main.txt", "main\n", "main moves")
    other = new_repo(ws / "other")
    _stack(other, "feature")
    hook_pid = tmp_path / "hook.pid"
    stalling_hook(repo, "post-commit", hook_pid)
    process = await launch(cancel_grace_s=0.5)
    client = await Client.open(ws_url(process))
    first = await create(client, "repo.rebase_branch", _rebase_feature(repo))
    await eventually(lambda: hook_pid.exists() and hook_pid.read_text().strip())
    second = await create(client, "repo.register_branch", {"repo": repo.name + "/", "branch": "feature",
                                                           "parent": "main"})
    elsewhere, _ = await run(client, "repo.register_branch", {"repo": other.name, "branch": "feature",
                                                              "parent": "main"})
    assert elsewhere["status"] == "completed"
    assert (await client.request({"type": "get", "task": second}))["data"]["steps"] == []
    await client.request({"type": "cancel", "task": first})
    second_updates = await updates_until_end(client, second)
    assert second_updates[-1]["task"]["status"] == "completed"
    # The lock is let go once the first action stopped and its rebase was settled (its
    # terminal event may be written a moment later).
    stopped = next(e for e in await history(client, first) if e["type"] == "task.cancel_requested")
    second_start = next(e for e in await history(client, second) if e["type"] == "step.started")
    assert second_start["at"] >= stopped["at"] and clean_and_idle(repo)


async def test_no_alias_of_a_repository_runs_beside_an_action_on_it(launch: Launch, tmp_path: Path,
                                                                   settings: Settings) -> None:
    """While a rebase holds `repo`, actions naming it by a trailing slash, `./`, `..`, a
    subdirectory, a symlink or a linked worktree are claimed but start no step until it
    ends, across two worker loops; the same relative path in another scope runs at once."""
    ws = scope_dir(settings)
    repo = new_repo(ws / "repo")
    _stack(repo, "feature")
    commit(repo, "main.txt", "main\n", "main moves")
    commit(repo, "src/code.txt", "code\n", "a subdirectory")
    (ws / "link").symlink_to(repo)
    (ws / "sub").mkdir()
    git(repo, "worktree", "add", "-q", "-b", "elsewhere", str(ws / "tree"))
    theirs = new_repo(scope_dir(settings, "other") / "repo")
    _stack(theirs, "feature")
    hook_pid = tmp_path / "hook.pid"
    stalling_hook(repo, "post-commit", hook_pid)
    process = await launch(cancel_grace_s=0.5, workers=2, worker_concurrency=8)
    client = await Client.open(ws_url(process))
    first = await create(client, "repo.rebase_branch", _rebase_feature(repo))
    await eventually(lambda: hook_pid.exists() and hook_pid.read_text().strip())
    aliases = ["repo/", "./repo", "sub/../repo", "repo/src", "link", "link/src/", "tree"]
    waiting = [await create(client, "repo.register_branch", {"repo": alias, "branch": "feature",
                                                             "parent": "main"}) for alias in aliases]
    other, _ = await run(client, "repo.register_branch",
                         {"repo": "repo", "branch": "feature", "parent": "main"}, scope="other")
    assert other["status"] == "completed", other["error"]

    async def all_claimed() -> bool:
        views = [(await client.request({"type": "get", "task": t}))["data"] for t in waiting]
        assert all(v["steps"] == [] for v in views), views  # claimed or not, no step ran
        return all(v["status"] == "running" for v in views)

    await eventually_async(all_claimed, within=15)
    for task in waiting:
        assert (await client.request({"type": "get", "task": task}))["data"]["steps"] == []
    await client.request({"type": "cancel", "task": first})

    async def all_ended() -> bool:
        views = [(await client.request({"type": "get", "task": t}))["data"] for t in [first, *waiting]]
        return all(v["status"] in ("completed", "failed", "cancelled") for v in views)

    await eventually_async(all_ended, within=30)
    stopped = next(e for e in await history(client, first) if e["type"] == "task.cancel_requested")
    for task, alias in zip(waiting, aliases, strict=True):
        events = await history(client, task)
        assert [e["type"] for e in events][-1] == "task.completed", (alias, events[-1])
        start = next(e for e in events if e["type"] == "step.started")
        assert start["at"] >= stopped["at"], alias
    assert clean_and_idle(repo) and git(repo, "symbolic-ref", "--short", "HEAD") == "main"
