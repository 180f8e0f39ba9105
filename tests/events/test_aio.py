"""The asyncio helpers: loops honour a cancel some await swallowed; stops are time-boxed."""

from __future__ import annotations

import asyncio
import logging

import pytest

from events.aio import pause, stop_tasks, wait_event


async def _swallowing() -> None:
    """An await that eats its cancel, as redis-py's commands can on Python 3.11."""
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        pass


async def test_a_loop_pausing_with_pause_stops_after_a_swallowed_cancel() -> None:
    """`pause` raises at once in a task whose cancel was swallowed (asyncio.sleep would not)."""
    async def loop() -> None:
        while True:
            await _swallowing()
            await pause(0.01)

    running = asyncio.create_task(loop())
    await asyncio.sleep(0)
    running.cancel()
    done, _ = await asyncio.wait({running}, timeout=2)
    assert done and running.cancelled()


async def test_a_loop_waiting_with_wait_event_stops_after_a_swallowed_cancel() -> None:
    """`wait_event` honours a swallowed cancel too."""
    async def loop() -> None:
        while True:
            await _swallowing()
            await wait_event(asyncio.Event(), 0.01)

    running = asyncio.create_task(loop())
    await asyncio.sleep(0)
    running.cancel()
    done, _ = await asyncio.wait({running}, timeout=2)
    assert done and running.cancelled()


async def test_stop_tasks_retrieves_errors_and_names_what_is_still_running(
        caplog: pytest.LogCaptureFixture) -> None:
    """An error a task ended with is logged (never "exception was never retrieved"); a task
    that outlives its cancel is logged with where it waits and returned, within the box."""
    release = asyncio.Event()

    async def fails() -> None:
        raise RuntimeError("boom")

    async def stuck() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                pass  # a bug of its own: never stops

    failing = asyncio.create_task(fails(), name="failing")
    stubborn = asyncio.create_task(stuck(), name="stubborn")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING):
        left = await asyncio.wait_for(stop_tasks([failing, stubborn], 0.2, logging.getLogger("t")), 5)
    assert left == {stubborn}
    assert "failing ended with an error" in caplog.text
    assert "stubborn did not stop" in caplog.text and "stuck" in caplog.text
    release.set()
    await asyncio.wait_for(stubborn, 5)
