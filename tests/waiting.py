"""Waiting on a condition with a deadline: the suite's only way to wait (never sleep-and-hope)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

POLL_S = 0.02


async def eventually(condition: Callable[[], object], within: float = 10.0) -> None:
    """Return once `condition()` is true; TimeoutError after `within` seconds."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - a condition on state, polled with a deadline
            await asyncio.sleep(POLL_S)


async def eventually_async(condition: Callable[[], Awaitable[object]], within: float = 10.0,
                           poll_s: float = 0.1) -> None:
    """Like `eventually`, for a condition that needs I/O to check (an HTTP probe, a retry)."""
    async with asyncio.timeout(within):
        while not await condition():  # noqa: ASYNC110 - polled with a deadline
            await asyncio.sleep(poll_s)
