"""Small asyncio helpers."""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until `event` is set or `timeout_s` passes; True when it was set.

    Not `asyncio.wait_for(event.wait(), t)`: on Python 3.11 that swallows a cancellation
    arriving as the event is set, and a loop built on it then never stops.
    `asyncio.timeout` keeps the cancellation. A cancellation some library swallowed (the
    task is still marked cancelling) is honoured here, so no loop outlives its cancel.
    """
    raise_if_cancelling()
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


def raise_if_cancelling() -> None:
    """Raise CancelledError if this task's cancellation was requested but swallowed (some
    libraries' awaits, redis-py's pub/sub among them, can eat it)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()
