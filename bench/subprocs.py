"""Shared by the benchmarks that run taskcast as real processes (`taskcast serve`, `relay`,
`worker`): start them on a scratch database, wait until they are ready, read /metrics, and
stop each one by its PID (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

from cli.supervisor import die_with_parent  # no server outlives a benchmark that was killed

# TASKCAST_BENCH_ROOT: run the subprocesses from another checkout (e.g. to compare revisions).
ROOT = Path(os.environ.get("TASKCAST_BENCH_ROOT") or Path(__file__).resolve().parent.parent)
NOFILE = 65536
STOP_GRACE_S = 10.0


def raise_nofile(want: int = NOFILE) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `want` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _child_setup() -> None:
    raise_nofile()
    die_with_parent()


def cancel_on_sigterm() -> None:
    """SIGTERM cancels the running task (the benchmark's main), so that its cleanup runs:
    subprocesses stopped, scratch database dropped. Call it from the main coroutine."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)


def stop_popen(proc: subprocess.Popen[bytes]) -> None:
    """Stop a peer's process by its PID: SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def tree(ps: psutil.Process) -> list[psutil.Process]:
    """A process and its descendants (a supervised `serve` and its node processes)."""
    try:
        return [ps, *ps.children(recursive=True)]
    except psutil.Error:
        return [ps]


def free_port() -> int:
    """A free loopback TCP port (for `taskcast serve --port`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Child:
    """One `python -m cli.main <role>` subprocess; its stderr goes to a temp file."""

    def __init__(self, role: str, args: Sequence[str], env: dict[str, str]) -> None:
        self.role = role
        self._log = tempfile.NamedTemporaryFile(prefix=f"bench_{role}_", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "cli.main", role, *args], cwd=ROOT, env=env,
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     preexec_fn=_child_setup)
        self.pid = self.proc.pid
        self.ps = psutil.Process(self.pid)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(Path(self._log.name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"taskcast {self.role} (pid {self.pid}) exited with {self.proc.returncode}:\n"
                               f"{self.log_tail()}")

    async def stop(self) -> int | None:
        """SIGTERM; SIGKILL if it has not exited after STOP_GRACE_S. Its exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
                self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_S
            while self.proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            if self.proc.poll() is None:
                print(f"  (taskcast {self.role} pid {self.pid} ignored SIGTERM; killed)", flush=True)
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        with contextlib.suppress(OSError):
            os.unlink(self._log.name)
        return self.proc.returncode


class Children:
    """The subprocesses a benchmark started; `async with` stops every one of them, by PID."""

    def __init__(self, database_url: str, redis_url: str, channel: str) -> None:
        # Every benchmark socket is the one anonymous principal: 10,000 of them must fit.
        self.env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url,
                    "TASKCAST_CHANNEL": channel, "TASKCAST_LOG": "WARNING",
                    "TASKCAST_MAX_CONNECTIONS_PER_PRINCIPAL": "100000"}
        self.env.pop("TASKCAST_SECRET", None)
        self.started: list[Child] = []

    def start(self, role: str, *args: str, env: dict[str, str] | None = None) -> Child:
        child = Child(role, args, {**self.env, **(env or {})})
        self.started.append(child)
        return child

    async def serve(self, *, ready: bool = False, processes: int = 1) -> tuple[Child, int]:
        """Start `taskcast serve --processes N` (one node process unless told) on a free port
        and wait for /healthz (or, with `ready`, /readyz: relay messages arrive). The child
        (with N > 1, the supervisor of the node processes) and its port."""
        port = free_port()
        child = self.start("serve", "--host", "127.0.0.1", "--port", str(port), "--processes", str(processes))
        await wait_http(child, port, "/readyz" if ready else "/healthz")
        return child, port

    async def __aenter__(self) -> Children:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for child in reversed(self.started):
            await child.stop()


async def http_get(port: int, path: str, within_s: float = 2.0) -> tuple[int, bytes]:
    """GET http://127.0.0.1:port/path (asking the server to close the connection after it)."""
    async with asyncio.timeout(within_s):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
                         .encode())
            raw = await reader.read()
        finally:
            writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def wait_http(child: Child, port: int, path: str, within: float = 30.0) -> None:
    """Poll until `path` answers 200."""
    deadline = time.monotonic() + within
    while True:
        child.check_alive()
        try:
            status, _ = await http_get(port, path)
            if status == 200:
                return
        except (OSError, TimeoutError, IndexError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"taskcast serve did not answer 200 on {path} within {within:.0f} s:\n"
                               f"{child.log_tail()}")
        await asyncio.sleep(0.05)


async def metrics(port: int) -> dict[str, float]:
    """The node's /metrics, as {name: value} (histogram buckets left out)."""
    _, body = await http_get(port, "/metrics")
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            out[name] = float(value)
    return out


async def wait_metric(port: int, name: str, at_least: float, within: float = 20.0) -> float:
    """Poll /metrics until `name` >= at_least; its value."""
    deadline = time.monotonic() + within
    while True:
        value = (await metrics(port)).get(name, 0.0)
        if value >= at_least:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} stayed at {value} (< {at_least}) for {within:.0f} s")
        await asyncio.sleep(0.05)


def postgres_processes() -> list[psutil.Process]:
    """Every PostgreSQL server process on this machine (read-only: for CPU accounting)."""
    found = []
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] in ("postgres", "postmaster"):
            found.append(proc)
    return found


class CpuMeter:
    """CPU seconds used by a set of processes between `start()` and `stop()`. With `find`,
    the set is listed again at `stop()` and a process born meanwhile counts in full."""

    def __init__(self, procs: Sequence[psutil.Process] = (),
                 find: Callable[[], Sequence[psutil.Process]] | None = None) -> None:
        self.procs = list(procs)
        self.find = find
        self._before: dict[int, float] = {}
        self._wall = 0.0
        self.used: dict[int, float] = {}
        self.wall_s = 0.0

    @staticmethod
    def _cpu(proc: psutil.Process) -> float | None:
        try:
            t = proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        return float(t.user + t.system)

    def start(self) -> CpuMeter:
        if self.find is not None:
            self.procs = list(self.find())
        self._wall = time.monotonic()
        self._before = {p.pid: c for p in self.procs if (c := self._cpu(p)) is not None}
        return self

    def stop(self) -> CpuMeter:
        self.wall_s = time.monotonic() - self._wall
        procs = list(self.find()) if self.find is not None else self.procs
        for p in procs:
            after = self._cpu(p)
            if after is not None:
                self.used[p.pid] = after - self._before.get(p.pid, 0.0)
        return self

    def seconds(self, pids: Sequence[int] | None = None) -> float:
        """Summed CPU seconds of `pids` (default: all) over the interval."""
        return sum(self.used.values()) if pids is None else sum(self.used.get(p, 0.0) for p in pids)

    def percent(self, pids: Sequence[int] | None = None) -> float:
        """Summed CPU use of `pids` (default: all) in % of one core over the interval."""
        return 100 * self.seconds(pids) / self.wall_s if self.wall_s else 0.0


class Background:
    """What else ran on the machine between `start()` and `stop()`: CPU used by every
    process outside this benchmark's own tree (PostgreSQL and Redis included, a test suite
    running alongside...), kernel interrupt work (softirq: the loopback network processing,
    ours included, is mostly here) and time stolen by the hypervisor."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self._t0 = 0.0
        self._cpu0: Any = None
        self._own0 = 0.0

    def _own(self) -> float:
        total = 0.0
        for proc in [self.me, *self.me.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                t = proc.cpu_times()
                total += t.user + t.system
        return total

    def start(self) -> Background:
        self._t0, self._cpu0, self._own0 = time.monotonic(), psutil.cpu_times(), self._own()
        return self

    def stop(self) -> str:
        wall = time.monotonic() - self._t0
        t1, t0 = psutil.cpu_times(), self._cpu0
        delta = {f: getattr(t1, f) - getattr(t0, f) for f in t1._fields}
        irq = delta.get("irq", 0.0) + delta.get("softirq", 0.0)
        steal = delta.get("steal", 0.0)
        processes = delta["user"] + delta["system"] + delta.get("nice", 0.0)
        others = max(0.0, processes - (self._own() - self._own0))

        def pct(x: float) -> str:
            return f"{100 * x / wall:.0f}%"

        return (f"meanwhile, of {psutil.cpu_count()} cores (% of one): other processes (PostgreSQL, "
                f"Redis, anything else) {pct(others)}, kernel irq/softirq {pct(irq)}, hypervisor steal "
                f"{pct(steal)}; load average {os.getloadavg()[0]:.2f}")
