"""`taskcast serve --processes N`: N node processes on one port, supervised.

Each child is a whole `taskcast serve` node (its own event loop, Redis subscription, hub
and sockets) listening with SO_REUSEPORT, so the kernel spreads new connections across
them; a socket stays with the process that accepted it. Nothing is shared between them
but the port: each follows the relay on its own, as separate nodes on separate machines
would.

The supervisor holds the port for its whole life (bound, never listening; with port 0 it
picks the port for all of them), restarts a child that dies (after a pause that doubles,
from RESTART_MIN_S to RESTART_MAX_S, while children keep dying young), and on SIGTERM or
SIGINT passes SIGTERM to every child (each stops as one node does: sockets closed with
1001, so clients resume on a sibling with `since`), waits for them within the stop
deadline, and kills what is left. A child outlives no supervisor: the kernel sends it
SIGTERM when its parent dies, even by SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping, Sequence

log = logging.getLogger("taskcast.supervisor")

RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
HEALTHY_AFTER_S = 30.0  # a child that ran this long starts the backoff over
PR_SET_PDEATHSIG = 1


def cores() -> int:
    """The cores this process may run on (the default number of node processes)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        return os.cpu_count() or 1


def die_with_parent() -> None:
    """Linux: have the kernel SIGTERM this process when its parent dies (even by SIGKILL).
    Used as `preexec_fn`."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) with SO_REUSEPORT and never listening: it holds the
    port (picking one for port 0) while the children bind it too. Raises OSError."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(info[4])
    except OSError:
        sock.close()
        raise
    return sock


class Supervisor:
    """Runs `command` `count` times, keeps each running, and stops them all on a signal."""

    def __init__(self, command: Sequence[str], count: int, env: Mapping[str, str],
                 stop_deadline_s: float) -> None:
        self.command = list(command)
        self.count = count
        self.env = dict(env)
        self.stop_deadline_s = stop_deadline_s
        self.children: list[asyncio.subprocess.Process | None] = [None] * count
        self.stopping = asyncio.Event()

    async def run(self) -> int:
        """Until SIGTERM or SIGINT; then every child stopped. 0 when each exited cleanly."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        slots = [asyncio.create_task(self._keep(i), name=f"supervisor.slot-{i}") for i in range(self.count)]
        codes = await asyncio.gather(*slots)
        return 0 if all(code == 0 for code in codes) else 1

    async def _keep(self, index: int) -> int | None:
        """One slot: its child, restarted until the stop; the last child's exit code."""
        pause = RESTART_MIN_S
        while True:
            started = time.monotonic()
            child = await asyncio.create_subprocess_exec(*self.command, env=self.env,
                                                         preexec_fn=die_with_parent)
            self.children[index] = child
            exited = asyncio.create_task(child.wait())
            stop = asyncio.create_task(self.stopping.wait())
            await asyncio.wait({exited, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if self.stopping.is_set():
                return await self._stop(child, exited)
            ran = time.monotonic() - started
            if ran >= HEALTHY_AFTER_S:
                pause = RESTART_MIN_S
            log.error("node process %d (pid %d) exited with %s after %.1f s; restarting it in %.1f s",
                      index, child.pid, child.returncode, ran, pause)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self.stopping.wait()
            if self.stopping.is_set():
                return 0
            pause = min(pause * 2, RESTART_MAX_S)

    async def _stop(self, child: asyncio.subprocess.Process, exited: asyncio.Task[int]) -> int | None:
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(self.stop_deadline_s):
                code = await exited
            # One that was still starting (no handler yet) dies of the signal: stopped as asked.
            return 0 if code == -signal.SIGTERM else code
        except TimeoutError:
            log.warning("node process pid %d did not stop within %.0f s; killing it",
                        child.pid, self.stop_deadline_s)
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            try:
                async with asyncio.timeout(self.stop_deadline_s):
                    return await exited
            except TimeoutError:
                log.error("node process pid %d survived SIGKILL", child.pid)
                return None
