"""`git.clone`, and running git for the kinds (this one and `repo.*`).

`git.clone` input: {"url": str, "dest": absolute path, "branch"?: str}. `url` is anything
`git clone` takes (a path, file://, https://, ssh://). One step, `clone`: `git clone
--progress` into a temporary sibling of `dest`, renamed to `dest` once complete, so `dest`
never holds a partial clone; a `dest` that already is a clone of `url` (an earlier
attempt got that far) is reported as it is. Progress comes from git's meters ("Receiving
objects: 45% ..."), other lines of its stderr are the step's output.
Result: {"dest", "head": sha or null (empty repository), "branch": str or null}.
A cancel or timeout kills git and removes the temporary directory (cleanup).
Clones into one `dest`, and `repo.*` kinds on it, run one at a time (mutex).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from events.errors import BadRequest
from events.kinds import KindSpec, proc
from events.runtime import StepError, TaskContext

# English messages to parse, and never a prompt or an editor waiting on a terminal.
GIT_ENV = {"LC_ALL": "C", "LANGUAGE": "C", "GIT_TERMINAL_PROMPT": "0", "GIT_EDITOR": "true",
           "GIT_SEQUENCE_EDITOR": "true", "GIT_MERGE_AUTOEDIT": "no"}
# Where each of git's meters falls in the step's progress.
PHASES = {"Counting objects": (0.0, 0.05), "Compressing objects": (0.05, 0.1),
          "Receiving objects": (0.1, 0.8), "Resolving deltas": (0.8, 0.95),
          "Updating files": (0.95, 1.0), "Checking out files": (0.95, 1.0)}
_METER = re.compile(r"(?:remote: )?(?P<phase>[A-Z][a-z]+(?: [a-z]+)*):\s+(?P<pct>\d{1,3})% \(\d+/\d+\)")
_REBASING = re.compile(r"Rebasing \((?P<done>\d+)/(?P<total>\d+)\)")


def parse_progress(line: str) -> tuple[float, str] | None:
    """(fraction of the step, message) from one of git's progress lines, else None."""
    if meter := _METER.match(line):
        phase = meter["phase"]
        if phase not in PHASES:
            return None
        low, high = PHASES[phase]
        pct = min(100, int(meter["pct"]))
        return round(low + (high - low) * pct / 100, 4), f"{phase.lower()} {pct}%"
    if rebasing := _REBASING.match(line):
        done, total = int(rebasing["done"]), int(rebasing["total"])
        return round((done - 1) / total, 4) if total else 0.0, f"rebasing commit {done} of {total}"
    return None


class Meter:
    """git's stderr as a step's progress (its meters) and output (its other lines)."""

    def __init__(self, ctx: TaskContext) -> None:
        self.ctx = ctx
        self.fraction = 0.0

    def __call__(self, line: str, progress: bool) -> None:
        text = line.rstrip()
        parsed = parse_progress(text)
        if parsed is not None:
            self.fraction = max(self.fraction, parsed[0])
            self.ctx.progress(self.fraction, parsed[1])
        if not progress and text:
            self.ctx.output([text])


def git_env() -> Mapping[str, str]:
    return {**os.environ, **GIT_ENV}


async def git(*args: str, cwd: str | Path, cancelled: asyncio.Event | None = None,
              on_line: proc.OnLine | None = None, check: bool = True,
              retryable: bool = False) -> proc.Finished:
    """Run `git args` in `cwd`. With `check`, a failure raises StepError with git's message.
    Pass `cancelled` only for long commands that may be stopped half way (TaskCancelled)."""
    try:
        done = await proc.run(["git", *args], cwd=str(cwd), env=git_env(), cancelled=cancelled,
                              on_line=on_line)
    except OSError as exc:
        raise StepError(f"cannot run git in {cwd}: {exc}") from exc
    if check and done.code != 0:
        raise StepError(f"git {args[0]} failed: {done.last_error()}", retryable=retryable)
    return done


def ref_name(value: object, what: str) -> str:
    """A branch or remote name (never one git could take for an option). Raises BadRequest."""
    if not isinstance(value, str) or not value or value.startswith("-") or not value.isprintable() \
            or any(c.isspace() for c in value):
        raise BadRequest(f"{what} must be a branch or remote name")
    return value


def name(input_: dict[str, Any], key: str, kind: str, default: str | None = None) -> str:
    return ref_name(input_.get(key, default), f"{kind}: `{key}`")


def path(input_: dict[str, Any], key: str, kind: str) -> Path:
    value = input_.get(key)
    if not isinstance(value, str) or not os.path.isabs(value):
        raise BadRequest(f"{kind}: `{key}` must be an absolute path")
    return Path(os.path.normpath(value))


def path_mutex(key: str) -> Callable[[dict[str, Any]], str | None]:
    """A mutex on the path `input[key]`: kinds working on one repository run one at a time.
    Pure string work: it runs in the gateway, which must not touch the disk."""

    def mutex(input_: dict[str, Any]) -> str | None:
        value = input_.get(key)
        if not isinstance(value, str) or not os.path.isabs(value):
            return None
        return f"repo:{os.path.normpath(value)}"

    return mutex


# git.clone


def _temp(dest: Path, task: str) -> Path:
    return dest.parent / f".{dest.name}.taskcast-{task}"


async def _describe(dest: Path) -> dict[str, Any]:
    head = await git("rev-parse", "--verify", "--quiet", "HEAD", cwd=dest, check=False)
    branch = await git("symbolic-ref", "--short", "--quiet", "HEAD", cwd=dest, check=False)
    return {"dest": str(dest), "head": head.stdout.strip() or None, "branch": branch.stdout.strip() or None}


async def _is_clone_of(dest: Path, url: str) -> bool:
    if not await asyncio.to_thread((dest / ".git").exists):
        return False
    origin = await git("config", "--get", "remote.origin.url", cwd=dest, check=False)
    return origin.stdout.strip() == url


async def clone(ctx: TaskContext) -> dict[str, Any]:
    url = ctx.input.get("url")
    if not isinstance(url, str) or not url or url.startswith("-"):
        raise BadRequest("git.clone: `url` must be a repository path or URL")
    dest = path(ctx.input, "dest", "git.clone")
    branch = name(ctx.input, "branch", "git.clone") if "branch" in ctx.input else None

    async def run_clone() -> dict[str, Any]:
        if await _is_clone_of(dest, url):
            return await _describe(dest)
        if await asyncio.to_thread(dest.exists):
            raise StepError(f"{dest} already exists")
        temp = _temp(dest, ctx.task)
        await asyncio.to_thread(_prepare, temp)
        try:
            await git("clone", "--progress", *(["--branch", branch] if branch else []), "--", url, str(temp),
                      cwd=dest.parent, cancelled=ctx.cancelled, on_line=Meter(ctx), retryable=True)
        except StepError:
            await asyncio.to_thread(shutil.rmtree, temp, True)
            raise
        await asyncio.to_thread(temp.rename, dest)
        return await _describe(dest)

    return await ctx.step("clone", run_clone)


def _prepare(temp: Path) -> None:
    """A clean start: the parent exists, no leftover of an interrupted attempt."""
    temp.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(temp, ignore_errors=True)


async def _cleanup_clone(ctx: TaskContext) -> None:
    """Remove the partial clone (git itself was killed when the step stopped)."""
    try:
        dest = path(ctx.input, "dest", "git.clone")
    except BadRequest:
        return
    await asyncio.to_thread(shutil.rmtree, _temp(dest, ctx.task), True)


CLONE = KindSpec("git.clone", clone, cleanup=_cleanup_clone, max_attempts=3, mutex=path_mutex("dest"))
