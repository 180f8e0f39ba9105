"""`git.clone`, and running git for the kinds (this one and `repo.*`).

`git.clone` input: {"url": str, "dest": path, "branch"?: str}. `dest` is relative to the
task's scope directory (events.kinds.workspace) and names a directory inside it. `url` is
one of (`source`):
- a network URL: `https://`, `ssh://`, `git://`, or scp-like `user@host:path`;
- a path relative to the scope directory, or an absolute path or `file://` URL that lies
  inside the scope directory or under one of the clone roots (Settings.clone_roots,
  TASKCAST_CLONE_ROOTS), by real path; its git directory must lie there too.
Anything else (other schemes, `ext::`, an option) is refused at the ack (`bad_request`);
a local path that resolves elsewhere fails the task. One step, `clone`: `git clone
--progress` into a temporary sibling of `dest`, renamed to `dest` once complete, so `dest`
never holds a partial clone; a `dest` that already is a clone of `url` (an earlier
attempt got that far) is reported as it is. Progress comes from git's meters ("Receiving
objects: 45% ..."), other lines of its stderr are the step's output.
Result: {"dest": the normalized relative path, "head": sha or null (empty repository),
"branch": str or null}. A cancel or timeout kills git and removes the temporary directory
(cleanup). Clones into one `dest`, and `repo.*` kinds on it, run one at a time (repolock).

git runs with a clean environment (`git_env`): none of the worker's variables (its
secrets among them), HOME the scope directory, repository discovery stopped at the
workspace root, and only the https, ssh, git and file transports.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from events.errors import BadRequest
from events.kind import KindSpec, StepError, TaskContext
from events.kinds import proc, repolock, workspace

# English messages to parse, and never a prompt or an editor waiting on a terminal.
GIT_ENV = {"LC_ALL": "C", "LANGUAGE": "C", "GIT_TERMINAL_PROMPT": "0", "GIT_EDITOR": "true",
           "GIT_SEQUENCE_EDITOR": "true", "GIT_MERGE_AUTOEDIT": "no", "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_ALLOW_PROTOCOL": "https:ssh:git:file"}
# Where each of git's meters falls in the step's progress.
PHASES = {"Counting objects": (0.0, 0.05), "Compressing objects": (0.05, 0.1),
          "Receiving objects": (0.1, 0.8), "Resolving deltas": (0.8, 0.95),
          "Updating files": (0.95, 1.0), "Checking out files": (0.95, 1.0)}
_METER = re.compile(r"(?:remote: )?(?P<phase>[A-Z][a-z]+(?: [a-z]+)*):\s+(?P<pct>\d{1,3})% \(\d+/\d+\)")
_REBASING = re.compile(r"Rebasing \((?P<done>\d+)/(?P<total>\d+)\)")
MAX_URL_CHARS = 4096
NETWORK_SCHEMES = ("https", "ssh", "git")
_SCP = re.compile(r"(?P<user>[A-Za-z0-9._-]+)@(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*):(?P<path>[^:].*)")


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


def git_env(home: Path) -> Mapping[str, str]:
    """git's whole environment for a task whose scope directory is `home`."""
    return {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(home), "LANG": "C.UTF-8",
            "GIT_CEILING_DIRECTORIES": str(home.parent), **GIT_ENV}


async def git(*args: str, cwd: str | Path, home: Path, cancelled: asyncio.Event | None = None,
              on_line: proc.OnLine | None = None, check: bool = True,
              retryable: bool = False) -> proc.Finished:
    """Run `git args` in `cwd` for the scope whose directory is `home`. With `check`, a
    failure raises StepError with git's message. Pass `cancelled` only for long commands
    that may be stopped half way (TaskCancelled)."""
    try:
        done = await proc.run(["git", *args], cwd=str(cwd), env=git_env(home), cancelled=cancelled,
                              on_line=on_line)
    except OSError as exc:
        raise StepError(f"cannot run git in {cwd}: {exc}") from exc
    if check and done.code != 0:
        raise StepError(f"git {args[0]} failed: {done.last_error()}", retryable=retryable)
    return done


def ref_name(value: object, what: str) -> str:
    """A branch or remote name (never one git could take for an option). Raises BadRequest."""
    if not isinstance(value, str) or not value or len(value) > 255 or value.startswith("-") \
            or not value.isprintable() or any(c.isspace() for c in value):
        raise BadRequest(f"{what} must be a branch or remote name")
    return value


def name(input_: Mapping[str, Any], key: str, kind: str, default: str | None = None) -> str:
    return ref_name(input_.get(key, default), f"{kind}: `input.{key}`")


def input_path(input_: Mapping[str, Any], key: str, kind: str, *, dot: bool = True,
               default: str | None = None) -> str:
    """`input[key]`, a path relative to the scope directory (lexically checked, normalized)."""
    return workspace.relative(input_.get(key, default), f"{kind}: `input.{key}`", dot=dot)


# clone sources


@dataclass(frozen=True)
class Source:
    """Where a clone reads from: a network URL as given, or a local path (`local`):
    relative to the scope directory (`relative`), or absolute."""

    url: str
    local: bool = False
    relative: bool = False


def source(value: object) -> Source:
    """The clone source named by `url` (pure). Raises BadRequest."""
    what = "git.clone: `input.url`"
    if not isinstance(value, str) or not value or len(value) > MAX_URL_CHARS or not value.isprintable() \
            or any(c.isspace() for c in value) or value.startswith("-"):
        raise BadRequest(f"{what} must be a repository URL or path of 1..{MAX_URL_CHARS} characters")
    if "://" in value:
        parts = urlsplit(value)
        scheme = parts.scheme.lower()
        if scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise BadRequest(f"{what}: a file:// URL names a local path (file:///...)")
            return _local(unquote(parts.path), what)
        if scheme not in NETWORK_SCHEMES:
            raise BadRequest(f"{what}: scheme {scheme!r} is not allowed (https, ssh, git, file)")
        if not parts.hostname or (parts.netloc.rpartition("@")[2] or "-").startswith("-") \
                or (parts.username or "").startswith("-"):
            raise BadRequest(f"{what} must name a host")
        return Source(value)
    if _SCP.fullmatch(value):
        return Source(value)
    if "::" in value or ":" in value.partition("/")[0]:
        raise BadRequest(f"{what}: not a URL git.clone accepts (https://, ssh://, git://, user@host:path, "
                         "or a path)")
    if value.startswith("/"):
        return _local(value, what)
    return Source(workspace.relative(value, what), local=True, relative=True)


def _local(path: str, what: str) -> Source:
    if not path.startswith("/") or "\0" in path:
        raise BadRequest(f"{what}: a local path must be absolute, or relative to the scope's workspace")
    return Source(os.path.normpath(path), local=True)


def resolve_source(src: Source, home: Path, clone_roots: Sequence[str]) -> str:
    """What to hand git for `src`: a network URL as is; a local repository by its real
    path, once it and its git directory are seen to lie inside the scope directory `home`
    or a clone root. Blocking. Raises Escape."""
    if not src.local:
        return src.url
    real = workspace.resolve(home, src.url, "git.clone: `input.url`") if src.relative \
        else Path(os.path.realpath(src.url))
    allowed = [home, *(Path(os.path.realpath(r)) for r in clone_roots)]
    base = next((b for b in allowed if workspace.contains(b, real)), None)
    if base is None:
        raise workspace.Escape("git.clone: `input.url` is a local path outside the scope's workspace "
                               "and outside the clone roots (TASKCAST_CLONE_ROOTS)")
    gitdir = real / ".git" if (real / ".git").exists() else real
    if gitdir.is_file():  # a gitfile: "gitdir: <elsewhere>"
        text = gitdir.read_text(errors="replace").strip()
        target = text.removeprefix("gitdir:").strip()
        gitdir = Path(os.path.realpath(real / target))
    if not workspace.contains(base, gitdir) or (gitdir / "objects" / "info" / "alternates").exists() \
            or (gitdir / "commondir").exists():
        raise workspace.Escape("git.clone: `input.url` is a repository whose objects lie elsewhere")
    return str(real)


def validate_clone(input_: Mapping[str, Any]) -> None:
    source(input_.get("url"))
    input_path(input_, "dest", "git.clone", dot=False)
    if "branch" in input_:
        name(input_, "branch", "git.clone")


# git.clone


def _temp(dest: Path, task: str) -> Path:
    return dest.parent / f".{dest.name}.taskcast-{task}"


async def _describe(dest: Path, shown: str, home: Path) -> dict[str, Any]:
    head = await git("rev-parse", "--verify", "--quiet", "HEAD", cwd=dest, home=home, check=False)
    branch = await git("symbolic-ref", "--short", "--quiet", "HEAD", cwd=dest, home=home, check=False)
    return {"dest": shown, "head": head.stdout.strip() or None, "branch": branch.stdout.strip() or None}


async def _is_clone_of(dest: Path, url: str, home: Path) -> bool:
    if not await asyncio.to_thread((dest / ".git").exists):
        return False
    origin = await git("config", "--get", "remote.origin.url", cwd=dest, home=home, check=False)
    return origin.stdout.strip() == url


def make_clone(clone_roots: Sequence[str] = ()) -> KindSpec:
    """The git.clone kind; local sources may also lie under `clone_roots`."""
    roots = tuple(clone_roots)

    async def clone(ctx: TaskContext) -> dict[str, Any]:
        validate_clone(ctx.input)  # the worker trusts no input either
        src = source(ctx.input["url"])
        shown = input_path(ctx.input, "dest", "git.clone", dot=False)
        branch = name(ctx.input, "branch", "git.clone") if "branch" in ctx.input else None
        home = await asyncio.to_thread(workspace.scope_dir, ctx.workspace_root, ctx.scope)

        async def run_clone() -> dict[str, Any]:
            url = await asyncio.to_thread(resolve_source, src, home, roots)
            dest = await asyncio.to_thread(workspace.resolve, home, shown, "git.clone: `input.dest`")
            if dest == home:
                raise workspace.Escape("git.clone: `input.dest` resolves to the scope's workspace itself")
            async with repolock.holding(ctx, dest):
                if await _is_clone_of(dest, url, home):
                    return await _describe(dest, shown, home)
                if await asyncio.to_thread(os.path.lexists, dest):
                    raise StepError(f"{shown} already exists")
                temp = _temp(dest, ctx.task)
                await asyncio.to_thread(_prepare, temp)
                try:
                    await git("clone", "--progress", *(["--no-local"] if src.local else []),
                              *(["--branch", branch] if branch else []), "--", url, str(temp),
                              cwd=dest.parent, home=home, cancelled=ctx.cancelled, on_line=Meter(ctx),
                              retryable=True)
                except StepError:
                    await asyncio.to_thread(shutil.rmtree, temp, True)
                    raise
                await asyncio.to_thread(temp.rename, dest)
                return await _describe(dest, shown, home)

        return await ctx.step("clone", run_clone)

    return KindSpec("git.clone", clone, cleanup=_cleanup_clone, max_attempts=3, validate=validate_clone)


def _prepare(temp: Path) -> None:
    """A clean start: the parent exists, no leftover of an interrupted attempt."""
    temp.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(temp, ignore_errors=True)


async def _cleanup_clone(ctx: TaskContext) -> None:
    """Remove the partial clone (git itself was killed when the step stopped)."""
    try:
        shown = input_path(ctx.input, "dest", "git.clone", dot=False)
        home = await asyncio.to_thread(workspace.scope_dir, ctx.workspace_root, ctx.scope)
        dest = await asyncio.to_thread(workspace.resolve, home, shown, "dest")
    except (BadRequest, StepError):
        return
    await asyncio.to_thread(shutil.rmtree, _temp(dest, ctx.task), True)


CLONE = make_clone()
