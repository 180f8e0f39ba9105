"""`repo.*`: actions on a local git working tree, one at a time per repository (mutex).

- `repo.sync` {"repo", "remote"?: "origin", "branch"?: the checked-out one}: steps `fetch`
  (git fetch --prune, with progress) and `fast_forward`. Result {"branch", "before",
  "after", "fast_forwarded"}; a branch that diverged from the remote's fails.
- `repo.rebase_branch` {"repo", "branch", "onto"}: step `rebase`. Result {"branch",
  "onto", "before", "after"}.
- `repo.restack` {"repo", "stack": [b1, b2, ..], "base"?: "main"} or {"repo", "branch":
  top}: step `plan` (the stack as given, or walked down from `top` through the parents
  `repo.register_branch` recorded), then `rebase <b>` for each branch in order: b1 onto
  the base, each next one onto its parent's new tip (`--onto parent <parent's old tip>`,
  the old tip being in the parent's recorded step result). Result {"base", "branches":
  [{"branch", "before", "after"}, ..]}.
- `repo.register_branch` {"repo", "branch", "parent"}: step `register`, recording the
  parent in git config `branch.<branch>.taskcast-parent`. Result {"branch", "parent"}.

`repo` is a path relative to the task's scope directory (events.kinds.workspace): the
repository's working tree, or any directory inside it. On the worker it is resolved by
real path, and the repository's working tree and git directory must lie inside the scope
directory (a symlink or a gitfile pointing elsewhere fails the task). The repository's
identity, the real path of the directory holding its git directory, keys the lock that
makes actions on it run one at a time (events.kinds.repolock), under whatever alias.

A rebase needs a clean working tree (untracked files aside) and leaves the checkout as it
found it. A conflict aborts the rebase and fails the step, not retryable, naming the
conflicting files. Before rebasing, a marker in the git directory records the task and
the checkout to restore; whoever finds it (the step's own `finally`, the cleanup after a
cancel, a later attempt after a crash) aborts the half-done rebase and restores it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

from events.errors import BadRequest
from events.kind import KindSpec, StepError, TaskContext
from events.kinds import proc, repolock, workspace
from events.kinds.git import Meter, git, input_path, name, ref_name

log = logging.getLogger("taskcast.kinds.repo")

MARKER = "taskcast-rebase.json"
PARENT_KEY = "taskcast-parent"
MAX_STACK = 100
SETTLE_S = 30.0  # to abort a half-done rebase once the action was stopped


class Repo:
    """A local working tree of the scope whose directory is `home`, through git. `path`
    is shown in messages as the task named it (`shown`), never as the worker's path."""

    def __init__(self, path_: Path, home: Path, *, shown: str = "", identity: Path | None = None,
                 gitdir: Path | None = None) -> None:
        self.path = path_
        self.home = home
        self.shown = shown or str(path_)
        self.identity = identity or path_
        self._gitdir = gitdir

    async def run(self, *args: str, check: bool = True, **kw: Any) -> proc.Finished:
        return await git(*args, cwd=self.path, home=self.home, check=check, **kw)

    async def sha(self, ref: str) -> str | None:
        done = await self.run("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
        return done.stdout.strip() if done.code == 0 else None

    async def branch(self, branch: str) -> str:
        """The tip of a local branch. Raises StepError when there is none."""
        sha = await self.sha(f"refs/heads/{branch}")
        if sha is None:
            raise StepError(f"no branch {branch!r} in {self.shown}")
        return sha

    async def commit(self, ref: str) -> str:
        sha = await self.sha(ref)
        if sha is None:
            raise StepError(f"{ref!r} is not a commit in {self.shown}")
        return sha

    async def is_ancestor(self, a: str, b: str) -> bool:
        done = await self.run("merge-base", "--is-ancestor", a, b, check=False)
        if done.code > 1:
            raise StepError(f"git merge-base failed: {done.last_error()}")
        return done.code == 0

    async def current_branch(self) -> str | None:
        done = await self.run("symbolic-ref", "--short", "--quiet", "HEAD", check=False)
        return done.stdout.strip() or None

    async def parent_of(self, branch: str) -> str | None:
        done = await self.run("config", "--get", f"branch.{branch}.{PARENT_KEY}", check=False)
        return done.stdout.strip() or None

    async def gitdir(self) -> Path:
        if self._gitdir is None:
            self._gitdir = Path((await self.run("rev-parse", "--absolute-git-dir")).stdout.strip())
        return self._gitdir

    async def rebasing(self) -> bool:
        gitdir = await self.gitdir()
        return await asyncio.to_thread(
            lambda: (gitdir / "rebase-merge").exists() or (gitdir / "rebase-apply").exists())

    async def conflicts(self) -> list[str]:
        done = await self.run("diff", "--name-only", "--diff-filter=U", check=False)
        return [line for line in done.stdout.splitlines() if line]

    # the marker of a rebase in progress

    async def begin(self, task: str) -> None:
        marker = {"task": task, "branch": await self.current_branch(), "sha": await self.commit("HEAD")}
        await asyncio.to_thread((await self.gitdir() / MARKER).write_text, json.dumps(marker))

    async def settle(self, task: str | None = None) -> None:
        """Undo what the marked rebase (of `task`, or of any task) left: abort it, restore
        the checkout, drop the marker. The marker stays if the abort did not work."""
        marker_path = await self.gitdir() / MARKER
        try:
            marker = json.loads(await asyncio.to_thread(marker_path.read_text))
        except (OSError, ValueError):
            return
        if task is not None and marker.get("task") != task:
            return
        if await self.rebasing():
            await self.run("rebase", "--abort", check=False)
            if await self.rebasing():
                log.warning("could not abort the rebase in %s", self.path)
                return
        if marker.get("branch"):
            await self.run("checkout", "--quiet", marker["branch"], check=False)
        else:
            await self.run("checkout", "--quiet", "--detach", marker["sha"], check=False)
        await asyncio.to_thread(marker_path.unlink, True)

    async def recover(self) -> None:
        """Settle what an interrupted attempt left, then require a clean working tree.
        Raises StepError."""
        await self.settle()
        if await self.rebasing():
            raise StepError(f"a rebase is in progress in {self.shown} (not started by taskcast): "
                            "finish or abort it first")
        if (await self.run("status", "--porcelain", "--untracked-files=no")).stdout.strip():
            raise StepError(f"{self.shown} has uncommitted changes")


async def rebase(ctx: TaskContext, repo: Repo, branch: str, onto: str, *,
                 upstream: str | None = None) -> dict[str, Any]:
    """Rebase the commits of `branch` after `upstream` (default: `onto`) onto `onto`.
    Raises StepError (a conflict names the files), TaskCancelled."""
    await repo.recover()
    before = await repo.branch(branch)
    onto_sha = await repo.commit(onto)
    upstream_sha = onto_sha if upstream is None else await repo.commit(upstream)
    result = {"branch": branch, "onto": onto, "before": before, "after": before}
    if await repo.is_ancestor(onto_sha, before):
        ctx.progress(1.0, f"{branch} is already on {onto}")
        return result
    await repo.begin(ctx.task)
    try:
        done = await repo.run("rebase", "--no-autostash", "--onto", onto_sha, upstream_sha, branch,
                              check=False, cancelled=ctx.cancelled, on_line=Meter(ctx))
        if done.code != 0:
            files = await repo.conflicts()
            if files:
                raise StepError(f"rebase of {branch} onto {onto} conflicts in: {', '.join(files)}")
            raise StepError(f"rebase of {branch} onto {onto} failed: {done.last_error()}")
        return {**result, "after": await repo.branch(branch)}
    finally:
        await repo.settle(ctx.task)


async def open_repo(ctx: TaskContext, kind: str) -> Repo:
    """The repository `input.repo` names, resolved and checked on the worker's disk.
    Raises StepError (Escape: it lies outside the scope's directory)."""
    shown = input_path(ctx.input, "repo", kind)
    home = await asyncio.to_thread(workspace.scope_dir, ctx.workspace_root, ctx.scope)
    where = await asyncio.to_thread(workspace.resolve, home, shown, f"{kind}: `input.repo`")
    if not await asyncio.to_thread(where.is_dir):
        raise StepError(f"{kind}: {shown!r} is not a directory")
    probe = Repo(where, home, shown=shown)
    found = await probe.run("rev-parse", "--path-format=absolute", "--git-common-dir", "--absolute-git-dir",
                            check=False)
    if found.code != 0:
        raise StepError(f"{kind}: {shown!r} is not in a git repository")
    top = (await probe.run("rev-parse", "--show-toplevel", check=False)).stdout.strip()
    common, gitdir, tree = await asyncio.to_thread(
        lambda: [Path(os.path.realpath(p)) for p in [*found.stdout.split("\n")[:2], top or str(where)]])
    if not all(workspace.contains(home, p) for p in (common, gitdir, tree)):
        raise workspace.Escape(f"{kind}: the repository at {shown!r} lies outside the scope's workspace")
    identity = common.parent if common.name == ".git" else common
    return Repo(tree, home, shown=shown, identity=identity, gitdir=gitdir)


def locked(kind: str, body: Callable[[TaskContext, Repo], Awaitable[dict[str, Any]]]
           ) -> Callable[[TaskContext], Coroutine[Any, Any, dict[str, Any]]]:
    """A kind's run: validate, open the repository, and run `body` holding its lock."""

    async def run(ctx: TaskContext) -> dict[str, Any]:
        VALIDATE[kind](ctx.input)  # the worker trusts no input either
        repo = await open_repo(ctx, kind)
        async with repolock.holding(ctx, repo.identity):
            try:
                return await body(ctx, repo)
            finally:
                # However the body ended (aborted past its cancel grace included), the
                # repository is settled before the lock lets the next action in.
                await _to_the_end(repo.settle(ctx.task), SETTLE_S)

    return run


async def _to_the_end(work: Coroutine[Any, Any, None], within_s: float) -> None:
    """Run `work` to its end (at most `within_s`), even if the caller is cancelled meanwhile;
    then re-raise that cancellation."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task}, timeout=within_s)
        raise


async def _cleanup(ctx: TaskContext) -> None:
    """Abort the task's half-done rebase and restore the checkout (git was killed)."""
    try:
        repo = await open_repo(ctx, ctx.view.get("kind", "repo"))
    except (BadRequest, StepError):
        return
    await repo.settle(ctx.task)


# the kinds


async def sync(ctx: TaskContext, repo: Repo) -> dict[str, Any]:
    remote = name(ctx.input, "remote", "repo.sync", "origin")
    wanted = name(ctx.input, "branch", "repo.sync") if "branch" in ctx.input else None
    ctx.plan(2)

    async def fetch() -> dict[str, Any]:
        branch = wanted or await repo.current_branch()
        if branch is None:
            raise StepError(f"{repo.path} has no branch checked out: name one in `branch`")
        await repo.run("fetch", "--prune", "--progress", remote, cancelled=ctx.cancelled,
                       on_line=Meter(ctx), retryable=True)
        theirs = await repo.sha(f"refs/remotes/{remote}/{branch}")
        if theirs is None:
            raise StepError(f"{remote} has no branch {branch!r}")
        return {"branch": branch, "remote_sha": theirs}

    fetched = await ctx.step("fetch", fetch)

    async def fast_forward() -> dict[str, Any]:
        branch, theirs = fetched["branch"], fetched["remote_sha"]
        ours = await repo.branch(branch)
        result = {"branch": branch, "before": ours, "after": ours, "fast_forwarded": False}
        if await repo.is_ancestor(theirs, ours):
            return result  # up to date, or ahead
        if not await repo.is_ancestor(ours, theirs):
            raise StepError(f"{branch} has diverged from {remote}/{branch}: not a fast-forward")
        if await repo.current_branch() == branch:
            await repo.run("merge", "--ff-only", "--quiet", theirs, on_line=Meter(ctx))
        else:
            await repo.run("update-ref", f"refs/heads/{branch}", theirs, ours)
        return {**result, "after": theirs, "fast_forwarded": True}

    return await ctx.step("fast_forward", fast_forward)  # type: ignore[no-any-return]


async def rebase_branch(ctx: TaskContext, repo: Repo) -> dict[str, Any]:
    branch = name(ctx.input, "branch", "repo.rebase_branch")
    onto = name(ctx.input, "onto", "repo.rebase_branch")
    return await ctx.step("rebase", lambda: rebase(ctx, repo, branch, onto))


async def _registered_stack(repo: Repo, top: str) -> tuple[list[str], str]:
    """The stack under `top` (bottom first) and its base, through the recorded parents."""
    chain = [top]
    while (parent := await repo.parent_of(chain[-1])) is not None:
        if parent in chain or len(chain) > MAX_STACK:
            raise StepError(f"the parents registered above {top} make a cycle: {' -> '.join(chain)}")
        chain.append(parent)
    if len(chain) == 1:
        raise StepError(f"{top} has no parent registered (repo.register_branch)")
    return chain[-2::-1], chain[-1]


def _restack_input(input_: Mapping[str, Any]) -> tuple[list[str] | None, str, str]:
    """(stack or None, base, top) of a restack's input. Raises BadRequest."""
    input_path(input_, "repo", "repo.restack")
    given = input_.get("stack")
    if given is None:
        return None, "", name(input_, "branch", "repo.restack")
    if not isinstance(given, list) or not given or len(given) > MAX_STACK:
        raise BadRequest(f"repo.restack: `input.stack` must be a list of 1..{MAX_STACK} branches")
    stack = [ref_name(b, "repo.restack: each of `input.stack`") for b in given]
    if len(set(stack)) != len(stack):
        raise BadRequest("repo.restack: a branch appears twice in `input.stack`")
    return stack, name(input_, "base", "repo.restack", "main"), ""


async def restack(ctx: TaskContext, repo: Repo) -> dict[str, Any]:
    given, base, top = _restack_input(ctx.input)

    async def plan() -> dict[str, Any]:
        stack, bottom = (given, base) if given is not None else await _registered_stack(repo, top)
        for branch in [bottom, *stack]:
            await repo.branch(branch)
        return {"stack": stack, "base": bottom}

    planned = await ctx.step("plan", plan)
    ctx.plan(1 + len(planned["stack"]))
    rebased = []
    onto, upstream = planned["base"], None
    for branch in planned["stack"]:
        async def one(branch: str = branch, onto: str = onto,
                      upstream: str | None = upstream) -> dict[str, Any]:
            return await rebase(ctx, repo, branch, onto, upstream=upstream)

        done = await ctx.step(f"rebase {branch}", one)
        rebased.append({k: done[k] for k in ("branch", "before", "after")})
        onto, upstream = branch, done["before"]
    return {"base": planned["base"], "branches": rebased}


async def register_branch(ctx: TaskContext, repo: Repo) -> dict[str, Any]:
    branch = name(ctx.input, "branch", "repo.register_branch")
    parent = name(ctx.input, "parent", "repo.register_branch")

    async def register() -> dict[str, Any]:
        await repo.branch(branch)
        await repo.branch(parent)
        above: str | None = parent
        for _ in range(MAX_STACK):
            if above is None:
                break
            if above == branch:
                raise StepError(f"{parent} is stacked on {branch}: that parent would make a cycle")
            above = await repo.parent_of(above)
        await repo.run("config", f"branch.{branch}.{PARENT_KEY}", parent)
        return {"branch": branch, "parent": parent}

    return await ctx.step("register", register)


# validation: pure, run by the node before the ack and again by the worker


def _validate_sync(input_: Mapping[str, Any]) -> None:
    input_path(input_, "repo", "repo.sync")
    name(input_, "remote", "repo.sync", "origin")
    if "branch" in input_:
        name(input_, "branch", "repo.sync")


def _validate_rebase(input_: Mapping[str, Any]) -> None:
    input_path(input_, "repo", "repo.rebase_branch")
    name(input_, "branch", "repo.rebase_branch")
    name(input_, "onto", "repo.rebase_branch")


def _validate_register(input_: Mapping[str, Any]) -> None:
    input_path(input_, "repo", "repo.register_branch")
    if name(input_, "branch", "repo.register_branch") == name(input_, "parent", "repo.register_branch"):
        raise BadRequest("repo.register_branch: a branch cannot be its own parent")


def _validate_restack(input_: Mapping[str, Any]) -> None:
    _restack_input(input_)


VALIDATE = {"repo.sync": _validate_sync, "repo.rebase_branch": _validate_rebase,
            "repo.restack": _validate_restack, "repo.register_branch": _validate_register}
# No queue mutex: the node cannot tell aliases apart, nor see the scope; repolock does it.
SYNC = KindSpec("repo.sync", locked("repo.sync", sync), cleanup=_cleanup, max_attempts=3,
                validate=_validate_sync)
REBASE_BRANCH = KindSpec("repo.rebase_branch", locked("repo.rebase_branch", rebase_branch), cleanup=_cleanup,
                         max_attempts=1, validate=_validate_rebase)
RESTACK = KindSpec("repo.restack", locked("repo.restack", restack), cleanup=_cleanup, max_attempts=1,
                   validate=_validate_restack)
REGISTER_BRANCH = KindSpec("repo.register_branch", locked("repo.register_branch", register_branch),
                           max_attempts=1, validate=_validate_register)
