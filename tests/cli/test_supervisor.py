"""`taskcast serve --processes N`: several node processes on one port, supervised."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from server.settings import Settings
from tests.spawn import taskcast
from tests.waiting import eventually, free_port, listening
from tests.wsclient import Client


def children(pid: int) -> set[int]:
    """The processes whose parent is `pid` (Linux)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def listeners(port: int) -> set[int]:
    """The pids of the processes listening on loopback TCP `port` (Linux /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                    pids.add(int(entry.name))
            except OSError:
                continue
    return pids


def serving(proc: subprocess.Popen[bytes], port: int) -> bool:
    """Whether two children of `proc` run, each listening on `port`."""
    nodes = children(proc.pid)
    return len(nodes) == 2 and listeners(port) == nodes


async def welcome(url: str) -> tuple[Client, int]:
    """A client after its hello, and the pid of the node process that welcomed it."""
    client = await Client.open(url, hello=False)
    frame = await client.request({"type": "hello", "client": "tests/1"})
    assert frame["type"] == "welcome", frame
    return client, int(frame["node"].rpartition(":")[2])


@pytest.fixture
async def supervised(settings: Settings) -> AsyncIterator[tuple[subprocess.Popen[bytes], int]]:
    """`taskcast serve --processes 2` on a free port; killed if a test leaves it running."""
    port = free_port()
    proc = taskcast(settings, "serve", "--port", str(port), "--processes", "2")
    try:
        await eventually(lambda: serving(proc, port), 30)
        yield proc, port
    finally:
        left = children(proc.pid)
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for pid in left:  # they die with their parent; this only hastens it
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


async def test_connections_are_spread_over_the_node_processes(
        supervised: tuple[subprocess.Popen[bytes], int]) -> None:
    """Sockets on the one port are served by both node processes, each a child of `serve`."""
    proc, port = supervised
    clients, nodes = [], set()
    try:
        for _ in range(40):
            client, pid = await welcome(f"ws://127.0.0.1:{port}/ws")
            clients.append(client)
            nodes.add(pid)
            if len(nodes) == 2:
                break
        assert nodes == children(proc.pid)
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def test_a_dead_node_process_is_replaced_and_sigterm_stops_them_all(
        supervised: tuple[subprocess.Popen[bytes], int]) -> None:
    """A node process killed with SIGKILL is restarted; SIGTERM closes every socket of every
    process with 1001, the supervisor exits 0 and leaves nothing listening."""
    proc, port = supervised
    url = f"ws://127.0.0.1:{port}/ws"
    first = children(proc.pid)
    victim = next(iter(first))
    os.kill(victim, signal.SIGKILL)
    await eventually(lambda: serving(proc, port) and victim not in children(proc.pid), 30)
    clients, nodes = [], set()
    for _ in range(40):  # both processes serve again
        client, pid = await welcome(url)
        clients.append(client)
        nodes.add(pid)
        if len(nodes) == 2:
            break
    assert nodes == children(proc.pid) and victim not in nodes
    proc.send_signal(signal.SIGTERM)
    for client in clients:
        try:
            async with asyncio.timeout(20):
                await client.ws.recv()
            raise AssertionError("a frame instead of the close")
        except ConnectionClosed as closed:
            assert closed.rcvd is not None and closed.rcvd.code == 1001
    await eventually(lambda: proc.poll() is not None, 40)
    assert proc.returncode == 0
    assert not listening(port) and not children(proc.pid)
