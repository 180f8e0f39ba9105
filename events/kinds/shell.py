"""`shell`: run one allow-listed command and stream its output.

Input: {"command": [argv..], "cwd"?: path}. No shell is involved: `command[0]` must be one
of the allowed commands (`make_shell(allowed)`; the server passes Settings.shell_allow,
from TASKCAST_SHELL_ALLOW, e.g. "echo,ls"), matched exactly as written, and is found on
PATH. With nothing allowed the kind is disabled and refuses every command. A refusal fails
the task before any step, not retryable.

The command runs in the task's scope directory (events.kinds.workspace), or in `cwd`, a
path relative to it that must resolve inside it. Its environment is `ENV` and nothing of
the worker's (which holds secrets such as TASKCAST_SECRET and DATABASE_URL):
PATH (the worker's), HOME (the scope directory), LANG=C.UTF-8, TMPDIR (the scope
directory's `.tmp`), and the task-attempt markers TASKCAST_TASK, TASKCAST_FENCE,
TASKCAST_STEP, TASKCAST_OWNER (events.attempt).

One step, `run`: stdout and stderr, merged, are the step's output, batched by the
runtime (the first MAX_LINES lines, each cut at proc.LINE_MAX_CHARS). Exit status 0
completes the task with result {"exit_code": 0, "lines": n}; any other fails it. A cancel
or timeout kills the command's whole process group; the step does that itself on every
way out (see `proc.run`), the worker's reaper does it if the worker dies, and a later
claim re-running the step does it first for what the dead claim left.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from events.errors import BadRequest
from events.kind import KindSpec, StepError, TaskContext
from events.kinds import proc, workspace

MAX_ARGS = 1000
MAX_ARG_CHARS = 10_000
MAX_LINES = 10_000  # of output kept per run; the rest is counted, not stored
TMP = ".tmp"


def env(home: Path) -> dict[str, str]:
    """The command's whole environment (before the attempt markers are added)."""
    return {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(home), "LANG": "C.UTF-8",
            "TMPDIR": str(home / TMP)}


def _argv(input_: Mapping[str, Any]) -> list[str]:
    argv = input_.get("command")
    if (not isinstance(argv, list) or not argv or len(argv) > MAX_ARGS
            or not all(isinstance(a, str) and len(a) <= MAX_ARG_CHARS and "\0" not in a for a in argv)
            or not argv[0]):
        raise BadRequest(f"shell: `input.command` must be a non-empty list of at most {MAX_ARGS} strings "
                         f"(argv) of at most {MAX_ARG_CHARS} characters, without NUL")
    return argv


def validate(input_: Mapping[str, Any]) -> None:
    _argv(input_)
    workspace.relative(input_.get("cwd", "."), "shell: `input.cwd`")


def _directory(home: Path, cwd: str) -> Path:
    where = workspace.resolve(home, cwd, "shell: `input.cwd`")
    if not where.is_dir():
        raise StepError(f"shell: `input.cwd` {cwd!r} is not a directory")
    (home / TMP).mkdir(exist_ok=True)
    return where


def make_shell(allowed: Sequence[str]) -> KindSpec:
    """The shell kind, running only the commands named in `allowed`."""
    allowed = tuple(a for a in allowed if a)

    async def run(ctx: TaskContext) -> dict[str, Any]:
        validate(ctx.input)  # the worker trusts no input either
        argv = _argv(ctx.input)
        cwd = workspace.relative(ctx.input.get("cwd", "."), "shell: `input.cwd`")
        if not allowed:
            raise StepError("shell is disabled: the server allows no commands (TASKCAST_SHELL_ALLOW)")
        if argv[0] not in allowed:
            raise StepError(f"shell: {argv[0]!r} is not allowed (allowed: {', '.join(allowed)})")
        home = await asyncio.to_thread(workspace.scope_dir, ctx.workspace_root, ctx.scope)
        lines = 0

        def line(text: str, progress: bool) -> None:
            nonlocal lines
            lines += 1
            if lines <= MAX_LINES:
                ctx.output([text])

        async def execute() -> dict[str, Any]:
            nonlocal lines
            lines = 0
            where = await asyncio.to_thread(_directory, home, cwd)
            try:
                done = await proc.run(argv, cwd=str(where), env=env(home), cancelled=ctx.cancelled,
                                      on_line=line, merge_stderr=True)
            except OSError as exc:
                raise StepError(f"shell: cannot run {argv[0]!r}: {exc}") from exc
            if lines > MAX_LINES:
                ctx.output([f"[{lines - MAX_LINES} more lines not kept]"])
            if done.code != 0:
                raise StepError(f"shell: {argv[0]} exited with status {done.code}")
            return {"exit_code": 0, "lines": lines}

        return await ctx.step("run", execute)

    return KindSpec("shell", run, max_attempts=1, validate=validate)
