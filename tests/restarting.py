"""A whole taskcast process that a test stops and starts again on the same port, against the
same database and Redis channel: a server restart as clients see it."""

from __future__ import annotations

import asyncio
from typing import Any

from cli.process import Process, Roles
from server.settings import Settings
from tests.waiting import free_port

LEASE_S = 2.0  # short, so a task interrupted by the restart is resumed within seconds


class Restartable:
    def __init__(self, settings: Settings, **changes: Any) -> None:
        self.settings = settings.with_(port=free_port(), **{"lease_s": LEASE_S, **changes})
        self.process: Process | None = None

    @property
    def port(self) -> int:
        return self.settings.port

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def start(self) -> Process:
        """Start the server, relay and two workers; return once the relay leads."""
        process = Process(self.settings, Roles(serve=True, relay=True, workers=2))
        await process.__aenter__()
        self.process = process
        assert process.relay is not None
        await asyncio.wait_for(process.relay.leading.wait(), 10)
        return process

    async def stop(self) -> None:
        """Stop in order (sockets closed with 1001, workers cancelled). Idempotent."""
        if self.process is not None:
            process, self.process = self.process, None
            await process.stop()

    async def restart(self) -> Process:
        await self.stop()
        return await self.start()
