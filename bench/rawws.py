"""Cheap websocket subscribers for the fan-out benchmarks, run in a child process.

Each subscriber is a plain asyncio Protocol: it writes the websocket handshake itself,
sends `hello` and `subscribe` as masked text frames, parses frames only until its
`subscribed` answer, and from then on only counts `"type":"update"` in the bytes it
receives (keeping the last len-1 bytes of each read, for a match split across reads):
no frame parsing, no JSON, so the client is not what limits the figures. A few
subscribers (`parse`) also parse every frame and its JSON, to check that the k-th frame
counted is the k-th event appended, and to time each event by its task and version.

The child talks to the benchmark over a multiprocessing pipe:
  -> ("run", expected_per_socket, timeout_s)   <- ("armed",) then ("done", results)
  -> ("close",)                                <- ("closed",)
Times are time.monotonic() (CLOCK_MONOTONIC: one clock for every process on Linux).
"""

from __future__ import annotations

import asyncio
import base64
import multiprocessing
import os
import struct
import time
from array import array
from multiprocessing.connection import Connection
from typing import Any

import orjson
import uvloop
from subprocs import die_with_parent, raise_nofile

UPDATE = b'"type":"update"'
KEEP = len(UPDATE) - 1
CONNECT_CONCURRENCY = 100


def client_frame(obj: dict[str, Any]) -> bytes:
    """A masked (client-to-server) text frame carrying `obj` as JSON."""
    payload = orjson.dumps(obj)
    n = len(payload)
    if n < 126:
        head = bytes((0x81, 0x80 | n))
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x81, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
    mask = os.urandom(4)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return head + mask + (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


def parse_frames(buf: bytearray) -> list[tuple[int, bytes]]:
    """Complete server frames (unmasked) at the start of `buf`, removed from it:
    (opcode, payload) each."""
    out: list[tuple[int, bytes]] = []
    i, size = 0, len(buf)
    while size - i >= 2:
        opcode, n, h = buf[i] & 0x0F, buf[i + 1] & 0x7F, 2
        if n == 126:
            if size - i < 4:
                break
            n, h = int.from_bytes(buf[i + 2:i + 4], "big"), 4
        elif n == 127:
            if size - i < 10:
                break
            n, h = int.from_bytes(buf[i + 2:i + 10], "big"), 10
        if size - i < h + n:
            break
        out.append((opcode, bytes(buf[i + h:i + h + n])))
        i += h + n
    del buf[:i]
    return out


class Subscriber(asyncio.Protocol):
    """One websocket. See the module docstring."""

    def __init__(self, group: Group, parse: bool) -> None:
        self.group = group
        self.parse = parse
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.handshaken = False
        self.counting = False
        self.waiting: tuple[bytes, asyncio.Future[bytes]] | None = None
        self.tail = b""
        self.count = 0
        self.expected = 0
        self.nbytes = 0
        self.steps: list[tuple[float, int]] = []  # (time, count after this read)
        self.parsed: list[tuple[float, str, int]] = []  # (time, task, version) per update
        self.lost = False
        self.error: str | None = None

    # setup

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        port = transport.get_extra_info("peername")[1]
        transport.write(  # type: ignore[attr-defined]
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: taskcast.v1\r\n\r\n".encode())

    def expect(self, marker: bytes) -> asyncio.Future[bytes]:
        """A future for the next frame whose payload contains `marker`."""
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        if self.error is not None:
            future.set_exception(RuntimeError(self.error))
            return future
        self.waiting = (marker, future)
        if self.buf and self.handshaken:
            self._setup_frames()
        return future

    def request(self, obj: dict[str, Any], marker: bytes) -> asyncio.Future[bytes]:
        future = self.expect(marker)
        assert self.transport is not None
        self.transport.write(client_frame(obj))
        return future

    def _setup_frames(self) -> None:
        for opcode, payload in parse_frames(self.buf):
            if opcode == 8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                self._fail(f"closed by the server: {code} {payload[2:].decode(errors='replace')}")
                return
            if self.waiting is None:
                continue
            marker, future = self.waiting
            if b'"type":"error"' in payload and not future.done():
                future.set_exception(RuntimeError(payload.decode()))
            elif marker in payload and not future.done():
                self.waiting = None
                future.set_result(payload)
                if marker == b'"type":"subscribed"':
                    # From here on only count; what is left in buf is already updates.
                    rest, self.buf = bytes(self.buf), bytearray()
                    self.counting = True
                    if rest:
                        self.data_received(rest)
                    return

    def _fail(self, why: str) -> None:
        self.error = self.error or why
        if self.waiting is not None and not self.waiting[1].done():
            self.waiting[1].set_exception(RuntimeError(why))
        self.waiting = None

    # data

    def data_received(self, data: bytes) -> None:
        if self.counting:
            self.nbytes += len(data)
            n = data.count(UPDATE) + (self.tail + data[:KEEP]).count(UPDATE)
            self.tail = data[-KEEP:] if len(data) >= KEEP else (self.tail + data)[-KEEP:]
            if self.parse:
                self._parse(data)
            if n:
                self.count += n
                if self.group.record:
                    self.steps.append((time.monotonic(), self.count))
                if self.count >= self.expected and self.expected:
                    self.group.finished(self)
            return
        self.buf += data
        if not self.handshaken:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self.buf[:self.buf.find(b"\r\n")])
            del self.buf[:end + 4]
            if b" 101 " not in status:
                self._fail(f"handshake refused: {status.decode(errors='replace')}")
                return
            self.handshaken = True
            if self.waiting is not None and self.waiting[0] == b"HTTP":
                future, self.waiting = self.waiting[1], None
                future.set_result(status)
        if self.handshaken and self.buf:
            self._setup_frames()

    def _parse(self, data: bytes) -> None:
        now = time.monotonic()
        self.buf += data
        for opcode, payload in parse_frames(self.buf):
            if opcode == 1 and payload.startswith(b'{"type":"update"'):
                event = orjson.loads(payload)["event"]
                self.parsed.append((now, event["task"], event["version"]))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(f"connection lost: {exc}")
        self.group.finished(self, lost=True)


class Group:
    """Every subscriber of the child, and the round in progress."""

    def __init__(self, record: bool) -> None:
        self.record = record
        self.subs: list[Subscriber] = []
        self.remaining = 0
        self.done_at = 0.0
        self.all_done = asyncio.Event()
        self._finished: set[int] = set()

    def finished(self, sub: Subscriber, *, lost: bool = False) -> None:
        if id(sub) in self._finished or not self.remaining:
            return
        self._finished.add(id(sub))
        self.remaining -= 1
        if not self.remaining:
            self.done_at = time.monotonic()
            self.all_done.set()

    def arm(self, expected: int) -> None:
        self._finished.clear()
        self.all_done.clear()
        self.remaining = len(self.subs)
        self.done_at = 0.0
        for sub in self.subs:
            sub.count, sub.expected, sub.nbytes = 0, expected, 0
            sub.steps.clear()
            sub.parsed.clear()


async def _open(group: Group, port: int, channel: str, parse: bool, gate: asyncio.Semaphore) -> Subscriber:
    loop = asyncio.get_running_loop()
    async with gate:
        _, sub = await loop.create_connection(lambda: Subscriber(group, parse), "127.0.0.1", port)
        assert isinstance(sub, Subscriber)
        if not sub.handshaken:
            await sub.expect(b"HTTP")
        await sub.request({"type": "hello", "id": 1, "client": "bench/1"}, b'"type":"welcome"')
        await sub.request({"type": "subscribe", "id": 2, "channel": channel}, b'"type":"subscribed"')
    return sub


async def _serve(pipe: Connection, port: int, count: int, channel: str, parse: int, record: bool) -> None:
    loop = asyncio.get_running_loop()
    group = Group(record)
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    started = time.monotonic()
    try:
        group.subs = list(await asyncio.gather(
            *(_open(group, port, channel, i < parse, gate) for i in range(count))))
    except Exception as exc:
        pipe.send(("failed", repr(exc)))
        return
    pipe.send(("ready", time.monotonic() - started))
    try:
        while True:
            msg = await loop.run_in_executor(None, pipe.recv)
            if msg[0] == "close":
                break
            _, expected, timeout_s = msg
            group.arm(expected)
            pipe.send(("armed",))
            try:
                await asyncio.wait_for(group.all_done.wait(), timeout_s)
            except TimeoutError:
                pass
            pipe.send(("done", _results(group, expected)))
    finally:
        for sub in group.subs:
            if sub.transport is not None:
                sub.transport.abort()
        await asyncio.sleep(0.05)
        pipe.send(("closed",))


def _results(group: Group, expected: int) -> dict[str, Any]:
    first = min((s.steps[0][0] for s in group.subs if s.steps), default=0.0)
    out: dict[str, Any] = {
        "done_at": group.done_at, "first_at": first,
        "counts": [s.count for s in group.subs], "bytes": sum(s.nbytes for s in group.subs),
        "lost": sum(s.lost for s in group.subs),
        "parsed": [s.parsed[:] for s in group.subs if s.parse],
    }
    if group.record:
        # arrival time of the k-th frame on each socket: an array of `expected` doubles each
        arrivals = []
        for sub in group.subs:
            times = array("d")
            for t, upto in sub.steps:
                times.extend([t] * (min(upto, expected) - len(times)))
            times.extend([float("nan")] * (expected - len(times)))
            arrivals.append(times.tobytes())
        out["arrivals"] = arrivals
    return out


def child(pipe: Connection, port: int, count: int, channel: str, parse: int, record: bool) -> None:
    """The child process's entry point (multiprocessing, spawn)."""
    die_with_parent()
    raise_nofile()
    uvloop.run(_serve(pipe, port, count, channel, parse, record))


class ChildProcess:
    """A benchmark's handle on a child process it talks to over a pipe: started with
    `spawn`, ready once it says so, stopped by its PID (asked, then joined, then killed)."""

    name = "bench-child"
    ready_s = 30.0

    def __init__(self, target: Any, *args: Any) -> None:
        self.target, self.args = target, args
        self.proc: Any = None
        self.pipe: Connection | None = None

    async def _recv(self, timeout_s: float) -> Any:
        assert self.pipe is not None
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, self.pipe.poll, timeout_s):
            raise TimeoutError(f"the subscriber process did not answer within {timeout_s:.0f} s")
        return self.pipe.recv()

    async def _start(self) -> Any:
        """Start the child; its `ready` message (anything else raises, the child stopped)."""
        ctx = multiprocessing.get_context("spawn")
        self.pipe, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=self.target, args=(theirs, *self.args), daemon=True,
                                name=self.name)
        self.proc.start()
        theirs.close()
        try:
            msg = await self._recv(self.ready_s)
            if msg[0] != "ready":
                raise RuntimeError(f"{self.name} could not connect: {msg[1]}")
        except BaseException:
            await self.close()
            raise
        return msg

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.is_alive() and self.pipe is not None:
                self.pipe.send(("close",))
                await self._recv(10)
        except (OSError, EOFError, TimeoutError):
            pass
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.proc.join, 5)
        if self.proc.is_alive():
            self.proc.kill()
            await loop.run_in_executor(None, self.proc.join, 5)
        if self.pipe is not None:
            self.pipe.close()
        self.proc = None


class SubscriberProcess(ChildProcess):
    """The benchmark's side: starts the child, runs rounds, stops it (by its PID)."""

    name = "bench-subscribers"
    ready_s = 60.0

    def __init__(self, port: int, count: int, channel: str, *, parse: int = 0, record: bool = False) -> None:
        super().__init__(child, port, count, channel, parse, record)
        self.count = count

    async def __aenter__(self) -> SubscriberProcess:
        self.setup_s: float = (await self._start())[1]
        return self

    async def arm(self, expected: int, timeout_s: float) -> None:
        """Start a round: every socket is to receive `expected` updates within `timeout_s`."""
        assert self.pipe is not None
        self.pipe.send(("run", expected, timeout_s))
        msg = await self._recv(10)
        assert msg == ("armed",), msg

    async def results(self, timeout_s: float) -> dict[str, Any]:
        msg = await self._recv(timeout_s)
        assert msg[0] == "done", msg
        return msg[1]  # type: ignore[no-any-return]
