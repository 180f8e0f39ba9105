"""Small asyncio helpers.

On Python 3.11 a cancellation can be swallowed by a library's await: redis-py sends every
command through `asyncio.wait_for`, which returns the result instead of raising when the
cancel lands as the send completes (so `await redis.publish(...)` returns normally in a
task whose cancel was requested). The task stays marked as cancelling, but nothing raises
again until the next cancel. So every loop here waits and pauses only through `wait_event`
and `pause`, which honour such a cancellation, and checks `raise_if_cancelling` before
any other wait without a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any


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


class Flag(asyncio.Event):
    """An asyncio.Event that also calls back when it is set, so that a coroutine can wait
    for the first of a task and a few flags (`until`) without a task per flag."""

    def __init__(self) -> None:
        super().__init__()
        self._callbacks: list[Callable[[], None]] = []

    def set(self) -> None:
        if not self.is_set():
            super().set()
            for callback in list(self._callbacks):
                callback()

    def add_callback(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def remove_callback(self, callback: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._callbacks.remove(callback)


async def until(task: asyncio.Future[Any], *flags: Flag, timeout_s: float | None = None) -> None:
    """Wait until `task` is done or one of `flags` is set, or `timeout_s` passes. Does not
    cancel `task`."""
    if task.done() or any(flag.is_set() for flag in flags):
        return
    woken = asyncio.get_running_loop().create_future()

    def wake(*_: object) -> None:
        if not woken.done():
            woken.set_result(None)

    task.add_done_callback(wake)
    for flag in flags:
        flag.add_callback(wake)
    try:
        if timeout_s is None:
            await woken
        else:
            async with asyncio.timeout(timeout_s):
                await woken
    except TimeoutError:
        pass
    finally:
        task.remove_done_callback(wake)
        for flag in flags:
            flag.remove_callback(wake)


async def pause(seconds: float) -> None:
    """`asyncio.sleep` for a loop's backoff or period: raises first when a cancellation of
    this task was requested and swallowed by some await before."""
    raise_if_cancelling()
    await asyncio.sleep(seconds)


def raise_if_cancelling() -> None:
    """Raise CancelledError if this task's cancellation was requested but swallowed (some
    libraries' awaits, redis-py's commands and pub/sub among them, can eat it)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]], timeout_s: float, log: logging.Logger, *,
                     report_errors: bool = True) -> set[asyncio.Task[Any]]:
    """Cancel `tasks` once and wait up to `timeout_s` for them to end (not twice: a second
    cancel would cut short what a task must finish, a shielded write or a settle). The
    error a task ended with is retrieved, and logged unless `report_errors` is false (its
    owner logged it already), so no "exception was never retrieved" surfaces later; one
    still running at the end is logged with where it waits. Returns those still running."""
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    finished = [task for task in tasks if task.done()]
    for task in pending:
        task.cancel()
    if pending:
        done, pending = await asyncio.wait(pending, timeout=timeout_s)
        finished.extend(done)
    for task in finished:
        if not task.cancelled() and task.exception() is not None and report_errors:
            log.error("%s ended with an error", task.get_name(), exc_info=task.exception())
    for task in pending:
        log.warning("%s did not stop within %.1f s; it waits at %s", task.get_name(), timeout_s,
                    where(task))
    return pending


def where(task: asyncio.Task[Any]) -> str:
    """Where a task waits: its chain of awaits, innermost last."""
    frames: list[str] = []
    coro: Any = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is not None:
            frames.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    return " > ".join(frames) or repr(task)
