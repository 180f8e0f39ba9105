"""A websocket subscriber of channel `all` in a child process, for drain.py and
start_latency.py: it notes, per task, when (time.time()) the first update of each watched
event type arrived.

Like rawws.py it writes the handshake and its frames itself (no websockets library); it
splits every frame but parses the JSON only of updates whose bytes hold a watched
`"type":"<event type>"`. It sends a `ping` every 10 s so that the node does not close it
as silent. It talks to the benchmark over a multiprocessing pipe:
  -> ("wait", event_type, count, timeout_s)   <- ("done", {task: arrival}, stats)
     (once `count` tasks had an update of `event_type`, or at the timeout; the records
     are cleared after each answer)
  -> ("close",)                               <- ("closed",)
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from multiprocessing.connection import Connection
from typing import Any

import orjson
import uvloop
from rawws import ChildProcess, client_frame, parse_frames
from subprocs import die_with_parent, raise_nofile

PING_S = 10.0


class Watcher(asyncio.Protocol):
    def __init__(self, watch: tuple[str, ...]) -> None:
        self.watch = {t: f'"type":"{t}"'.encode() for t in watch}
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.handshaken = False
        self.waiting: tuple[bytes, asyncio.Future[bytes]] | None = None
        self.seen: dict[str, dict[str, float]] = {t: {} for t in watch}
        self.updates = 0
        self.resyncs = 0
        self.error: str | None = None
        self.changed = asyncio.Event()
        self.upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        port = transport.get_extra_info("peername")[1]
        transport.write(  # type: ignore[attr-defined]
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: taskcast.v1\r\n\r\n".encode())

    def request(self, obj: dict[str, Any], marker: bytes) -> asyncio.Future[bytes]:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiting = (marker, future)
        assert self.transport is not None
        self.transport.write(client_frame(obj))
        return future

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self.buf += data
        if not self.handshaken:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self.buf[:self.buf.find(b"\r\n")])
            del self.buf[:end + 4]
            if b" 101 " not in status:
                self.error = f"handshake refused: {status.decode(errors='replace')}"
                self.upgraded.set_exception(RuntimeError(self.error))
                return
            self.handshaken = True
            self.upgraded.set_result(None)
        hit = False
        for opcode, payload in parse_frames(self.buf):
            if opcode == 8:
                self.error = f"closed by the server: {payload[2:].decode(errors='replace')}"
                hit = True
                continue
            if opcode != 1:
                continue
            if payload.startswith(b'{"type":"update"'):
                self.updates += 1
                for etype, marker in self.watch.items():
                    if marker in payload:
                        event = orjson.loads(payload)["event"]
                        if event["type"] == etype:
                            self.seen[etype].setdefault(event["task"], now)
                            hit = True
                        break
                continue
            if b'"type":"resync"' in payload:
                self.resyncs += 1
            if self.waiting is not None:
                marker, future = self.waiting
                if b'"type":"error"' in payload and not future.done():
                    future.set_exception(RuntimeError(payload.decode()))
                elif marker in payload and not future.done():
                    self.waiting = None
                    future.set_result(payload)
        if hit:
            self.changed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.error = self.error or f"connection lost: {exc}"
        self.changed.set()


async def _serve(pipe: Connection, port: int, watch: tuple[str, ...]) -> None:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(20):
            _, sub = await loop.create_connection(lambda: Watcher(watch), "127.0.0.1", port)
            assert isinstance(sub, Watcher)
            await sub.upgraded
            await sub.request({"type": "hello", "id": 1, "client": "bench/1"}, b'"type":"welcome"')
            await sub.request({"type": "subscribe", "id": 2, "channel": "all"}, b'"type":"subscribed"')
    except Exception as exc:
        pipe.send(("failed", repr(exc)))
        return

    async def pinger() -> None:
        n = 10
        while True:
            await asyncio.sleep(PING_S)
            n += 1
            if sub.transport is not None and not sub.transport.is_closing():
                sub.transport.write(client_frame({"type": "ping", "id": n}))

    pinging = asyncio.create_task(pinger())
    pipe.send(("ready",))
    try:
        while True:
            msg = await loop.run_in_executor(None, pipe.recv)
            if msg[0] == "close":
                break
            _, etype, count, timeout_s = msg
            deadline = time.monotonic() + timeout_s
            while len(sub.seen[etype]) < count and sub.error is None and time.monotonic() < deadline:
                sub.changed.clear()
                try:
                    await asyncio.wait_for(sub.changed.wait(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    break
            stats = {"updates": sub.updates, "resyncs": sub.resyncs, "error": sub.error}
            pipe.send(("done", {t: dict(v) for t, v in sub.seen.items()}, stats))
            for v in sub.seen.values():
                v.clear()
            sub.updates = 0
    finally:
        pinging.cancel()
        if sub.transport is not None:
            sub.transport.abort()
        await asyncio.sleep(0.05)
        pipe.send(("closed",))


def child(pipe: Connection, port: int, watch: tuple[str, ...]) -> None:
    die_with_parent()
    raise_nofile()
    uvloop.run(_serve(pipe, port, watch))


class WatcherProcess(ChildProcess):
    """The benchmark's side: starts the child, asks it to wait, stops it (by its PID)."""

    name = "bench-watcher"

    def __init__(self, port: int, watch: tuple[str, ...]) -> None:
        super().__init__(child, port, watch)

    async def __aenter__(self) -> WatcherProcess:
        await self._start()
        return self

    async def wait(self, etype: str, count: int, timeout_s: float) -> tuple[dict[str, dict[str, float]],
                                                                          dict[str, Any]]:
        """Wait until `count` tasks had an `etype` update (or `timeout_s`): the arrival
        times seen (per watched type, per task) and the stats; then the records are cleared."""
        assert self.pipe is not None
        self.pipe.send(("wait", etype, count, timeout_s))
        msg = await self._recv(timeout_s + 10)
        assert msg[0] == "done", msg
        return msg[1], msg[2]
