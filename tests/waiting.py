"""Waiting on a condition with a deadline: the suite's only way to wait (never sleep-and-hope)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

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


def free_port() -> int:
    """A loopback port nobody listens on (for a server a test starts and restarts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    """Whether something accepts connections on loopback `port`."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def cancelled(*tasks: asyncio.Task[Any], within: float = 10.0) -> None:
    """Cancel `tasks` and wait for them to end; AssertionError after `within` seconds
    names those still running (a task that outlives its cancel is a bug, not a wait)."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=within)
    assert not pending, f"still running {within:g} s after their cancel: {[t.get_name() for t in pending]}"
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: the test decides what an error means


async def run(*argv: str, within: float, cwd: Path, env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Run a program to its end: its exit status and output (stdout and stderr). Killed,
    and TimeoutError, when it has not ended `within` seconds."""
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), within)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")
