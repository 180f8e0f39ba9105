"""The agent that `provision` starts in a workspace: a small long-lived server process.

    python -m events.kinds.agent --dir WORKSPACE [--listen-fd FD]

It serves on the listening socket FD it was handed (provision makes it outside the
sandbox, so an agent without network still answers on the worker's loopback), or on a
new one on 127.0.0.1. One agent per workspace, ever: the agent holds an exclusive flock
on `WORKSPACE/.taskcast-agent.lock` for its whole life (the kernel drops it when the
agent dies, however it dies); a second agent started for the workspace finds it taken,
reports BUSY and the command exits with status 3.
The command returns once the agent is ready, printing one JSON line
`{"pid": .., "address": "127.0.0.1:PORT"}`; the agent itself lives on in its own session
(it is forked off, so it is nobody's child to reap and survives the worker that started
it). It writes the same JSON to `WORKSPACE/.taskcast-agent.json` *before* reporting ready:
whoever started it, or a cleanup after the starter was killed, can always find it. If the
starter is gone before the agent could report (its pipe is closed), the agent exits, so
an agent nobody heard of never lingers.

Line protocol over TCP, one request line, one answer line:
    PING          -> PONG <pid>
    OPEN <key>    -> SESSION <id>   (the same key always gets the same session)
    STOP          -> BYE            (then the agent exits)
    anything else -> ERR <message>
It also exits on SIGTERM/SIGINT and when its workspace directory disappears.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import sys
import traceback
from pathlib import Path

STATE_FILE = ".taskcast-agent.json"
LOG_FILE = ".taskcast-agent.log"
LOCK_FILE = ".taskcast-agent.lock"
BUSY = b"BUSY"
EXIT_BUSY = 3
WATCH_S = 1.0  # how often the agent checks that its workspace still exists
LINE_MAX_BYTES = 4096


class Agent:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.sessions: dict[str, str] = {}
        self.stopping = asyncio.Event()

    async def answer(self, line: str) -> str:
        command, _, arg = line.strip().partition(" ")
        if command == "PING":
            return f"PONG {os.getpid()}"
        if command == "OPEN" and arg:
            session = self.sessions.setdefault(arg, f"ses_{secrets.token_hex(8)}")
            return f"SESSION {session}"
        if command == "STOP":
            self.stopping.set()
            return "BYE"
        return f"ERR unknown request {line.strip()[:100]!r}"

    async def serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                if len(line) > LINE_MAX_BYTES:
                    break
                writer.write((await self.answer(line.decode(errors="replace")) + "\n").encode())
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_S)
            if not self.directory.is_dir():  # the workspace was removed: nothing to serve
                self.stopping.set()
                return


async def _serve(agent: Agent, sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stopping.set)
    server = await asyncio.start_server(agent.serve_client, sock=sock, limit=LINE_MAX_BYTES)
    watcher = asyncio.create_task(agent.watch())
    try:
        await agent.stopping.wait()
    finally:
        watcher.cancel()
        server.close()
        await server.wait_closed()


def _close_fds_but(*keep: int) -> None:
    low = 0
    for fd in sorted(set(keep)):
        if low < fd:  # closerange(n, n) would close everything from n on
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _daemon(directory: Path, sock: socket.socket, ready_fd: int) -> None:
    """The forked agent: detach, announce, serve until stopped."""
    os.setsid()
    lock = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # another agent serves this workspace
        with contextlib.suppress(BrokenPipeError):
            os.write(ready_fd, BUSY)
        return
    devnull = os.open(os.devnull, os.O_RDONLY)
    log = os.open(directory / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    # Hold none of the starter's descriptors: uvloop's children inherit duplicates of their
    # stdio pipes, and one kept open here would keep the starter's reader waiting forever.
    _close_fds_but(0, 1, 2, sock.fileno(), ready_fd, lock)
    host, port = sock.getsockname()[:2]
    state = json.dumps({"pid": os.getpid(), "address": f"{host}:{port}"})
    state_path = directory / STATE_FILE
    tmp = directory / f"{STATE_FILE}.{os.getpid()}"
    tmp.write_text(state)
    tmp.replace(state_path)
    try:
        os.write(ready_fd, state.encode())
        os.close(ready_fd)
    except BrokenPipeError:
        state_path.unlink(missing_ok=True)  # the starter is gone: nobody knows of us
        return
    try:
        asyncio.run(_serve(Agent(directory), sock))
    finally:
        with contextlib.suppress(OSError):
            if json.loads(state_path.read_text()).get("pid") == os.getpid():
                state_path.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m events.kinds.agent")
    parser.add_argument("--dir", required=True, type=Path, help="the workspace to serve")
    parser.add_argument("--listen-fd", type=int, help="a listening socket to serve on")
    args = parser.parse_args(argv)
    directory = args.dir.resolve()
    if not directory.is_dir():
        print(f"agent: {directory} is not a directory", file=sys.stderr)
        return 2
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    if args.listen_fd is not None:
        sock = socket.socket(fileno=args.listen_fd)
    else:
        sock = socket.create_server(("127.0.0.1", 0))
    read_fd, write_fd = os.pipe()
    if os.fork() == 0:
        os.close(read_fd)
        code = 0
        try:
            _daemon(directory, sock, write_fd)
        except BaseException:
            traceback.print_exc()  # into the agent's log, once it has one
            code = 1
        os._exit(code)
    os.close(write_fd)
    sock.close()
    chunks = []
    while chunk := os.read(read_fd, 4096):
        chunks.append(chunk)
    if not chunks:
        print("agent: did not start (see its log in the workspace)", file=sys.stderr)
        return 1
    if b"".join(chunks) == BUSY:
        print("agent: another agent already serves this workspace", file=sys.stderr)
        return EXIT_BUSY
    print(b"".join(chunks).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
