"""`demo`: N steps of M ms each, reporting progress. For demos, tests and benchmarks.

Input: {"steps": N, "step_ms": M, "fail_step": k, "ask_step": k}. `fail_step` makes step k
fail once (retryable); `ask_step` asks a command_approval question before step k, and
"deny" fails the task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from events.errors import BadRequest
from events.kind import KindSpec, StepError, TaskContext


def _int(input_: Mapping[str, Any], name: str, default: int | None, high: int) -> int | None:
    value = input_.get(name, default)
    if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)
                              or not 0 <= value <= high):
        raise BadRequest(f"demo: `input.{name}` must be a number in 0..{high}")
    return None if value is None else int(value)


def validate(input_: Mapping[str, Any]) -> None:
    for name, default, high in (("steps", 3, 1000), ("step_ms", 100, 3_600_000), ("fail_step", None, 1000),
                                ("ask_step", None, 1000)):
        _int(input_, name, default, high)


async def run(ctx: TaskContext) -> dict[str, Any]:
    steps = _int(ctx.input, "steps", 3, 1000) or 0
    step_ms = _int(ctx.input, "step_ms", 100, 3_600_000) or 0
    fail_step = _int(ctx.input, "fail_step", None, 1000)
    ask_step = _int(ctx.input, "ask_step", None, 1000)
    ctx.plan(steps)

    for i in range(1, steps + 1):
        if i == ask_step:
            choice = await ctx.ask("command_approval", f"Run step {i}?", options=["approve", "deny"])
            if choice != "approve":
                raise StepError(f"step {i} was denied")

        async def work(i: int = i) -> int:
            if step_ms:
                await asyncio.sleep(step_ms / 2000)
            ctx.progress(0.5, f"step {i} half done")
            if i == fail_step and ctx.attempt == 1:
                raise StepError(f"step {i} failed on purpose", retryable=True)
            if step_ms:
                await asyncio.sleep(step_ms / 2000)
            return i

        await ctx.step(f"step_{i}", work)
    return {"steps": steps}


DEMO = KindSpec("demo", run, max_attempts=3, validate=validate)
