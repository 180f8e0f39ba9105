"""`shell`: run one allow-listed command and stream its output.

Input: {"command": [argv..], "cwd"?: absolute path}. No shell is involved: `command[0]`
must be one of the allowed commands (`make_shell(allowed)`; the server passes
Settings.shell_allow, from TASKCAST_SHELL_ALLOW, e.g. "echo,ls"), matched exactly as
written, and is found on PATH.
With nothing allowed the kind is disabled and refuses every command. A refusal fails the
task before any step, not retryable.

One step, `run`: stdout and stderr, merged, are the step's output, batched by the
runtime (the first MAX_LINES lines, each cut at proc.LINE_MAX_CHARS). Exit status 0
completes the task with result {"exit_code": 0, "lines": n}; any other fails it. A cancel
or timeout kills the command's whole process group; the step does that itself on every
way out (see `proc.run`), so no cleanup hook is needed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from events.errors import BadRequest
from events.kinds import KindSpec, proc
from events.runtime import StepError, TaskContext

MAX_ARGS = 1000
MAX_ARG_CHARS = 10_000
MAX_LINES = 10_000  # of output kept per run; the rest is counted, not stored


def _argv(input_: dict[str, Any]) -> list[str]:
    argv = input_.get("command")
    if (not isinstance(argv, list) or not argv or len(argv) > MAX_ARGS
            or not all(isinstance(a, str) and len(a) <= MAX_ARG_CHARS for a in argv) or not argv[0]):
        raise BadRequest("shell: `command` must be a non-empty list of strings (argv)")
    return argv


def make_shell(allowed: Sequence[str]) -> KindSpec:
    """The shell kind, running only the commands named in `allowed`."""
    allowed = tuple(a for a in allowed if a)

    async def run(ctx: TaskContext) -> dict[str, Any]:
        argv = _argv(ctx.input)
        cwd = ctx.input.get("cwd")
        if cwd is not None and (not isinstance(cwd, str) or not os.path.isabs(cwd)):
            raise BadRequest("shell: `cwd` must be an absolute path")
        if not allowed:
            raise StepError("shell is disabled: the server allows no commands (TASKCAST_SHELL_ALLOW)")
        if argv[0] not in allowed:
            raise StepError(f"shell: {argv[0]!r} is not allowed (allowed: {', '.join(allowed)})")
        lines = 0

        def line(text: str, progress: bool) -> None:
            nonlocal lines
            lines += 1
            if lines <= MAX_LINES:
                ctx.output([text])

        async def execute() -> dict[str, Any]:
            nonlocal lines
            lines = 0
            try:
                done = await proc.run(argv, cwd=cwd, cancelled=ctx.cancelled, on_line=line, merge_stderr=True)
            except OSError as exc:
                raise StepError(f"shell: cannot run {argv[0]!r}: {exc}") from exc
            if lines > MAX_LINES:
                ctx.output([f"[{lines - MAX_LINES} more lines not kept]"])
            if done.code != 0:
                raise StepError(f"shell: {argv[0]} exited with status {done.code}")
            return {"exit_code": 0, "lines": lines}

        return await ctx.step("run", execute)

    return KindSpec("shell", run, max_attempts=1)
