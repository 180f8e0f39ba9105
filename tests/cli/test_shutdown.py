"""Graceful shutdown of a real `taskcast serve` process."""

from __future__ import annotations

import asyncio
import signal

from websockets.exceptions import ConnectionClosed

from server.settings import Settings
from tests.spawn import taskcast
from tests.waiting import eventually, free_port, listening
from tests.wsclient import Client


async def test_sigterm_closes_every_socket_with_1001_and_exits(settings: Settings) -> None:
    """On SIGTERM the node stops accepting, closes its sockets with 1001, and exits 0."""
    port = free_port()
    proc = taskcast(settings, "serve", "--port", str(port))
    try:
        await eventually(lambda: listening(port), 20)
        clients = [await Client.open(f"ws://127.0.0.1:{port}/ws") for _ in range(3)]
        proc.send_signal(signal.SIGTERM)
        for client in clients:
            try:
                async with asyncio.timeout(10):
                    await client.ws.recv()
                raise AssertionError("a frame instead of the close")
            except ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code == 1001
        await eventually(lambda: proc.poll() is not None, 15)
        assert proc.returncode == 0
        assert not listening(port)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
