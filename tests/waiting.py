"""Waiting on a condition with a deadline: the suite's only way to wait (never sleep-and-hope)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

POLL_S = 0.02


async def eventually(condition: Callable[[], object], within: float = 10.0) -> None:
    """Return once `condition()` is true; TimeoutError after `within` seconds."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - a condition on state, polled with a deadline
            await asyncio.sleep(POLL_S)
