"""`demo`: N steps of M ms each, reporting progress. For demos, tests and benchmarks."""

from __future__ import annotations

import asyncio
from typing import Any

from events.errors import BadRequest
from events.runtime import TaskContext


async def demo(ctx: TaskContext) -> dict[str, Any]:
    steps = ctx.input.get("steps", 3)
    step_ms = ctx.input.get("step_ms", 100)
    if not isinstance(steps, int) or not 0 <= steps <= 1000:
        raise BadRequest("demo: steps must be an int in 0..1000")
    if not isinstance(step_ms, int | float) or not 0 <= step_ms <= 3_600_000:
        raise BadRequest("demo: step_ms must be a number of milliseconds")
    ctx.plan(steps)

    for i in range(1, steps + 1):
        async def work(i: int = i) -> int:
            if step_ms:
                await asyncio.sleep(step_ms / 2000)
            ctx.progress(0.5, f"step {i} half done")
            if step_ms:
                await asyncio.sleep(step_ms / 2000)
            return i

        await ctx.step(f"step_{i}", work)
    return {"steps": steps}
