"""Process control for the embedded servers: each is spawned in its own session (as
`nobody` when we are root, PostgreSQL refusing root), watched by a watchdog that stops it
when this process ends however it ends, found by its data directory after a crash, and
stopped along a ladder of signals. Also free ports and log tails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import psutil  # type: ignore[import-untyped]

_log = logging.getLogger("taskcast.embedded")

HOST = "127.0.0.1"
RUN_AS_WHEN_ROOT = "nobody"
START_TIMEOUT = 60.0  # crash recovery or a large AOF can take a while
POLL = 0.02

# Servers this process started, by PID: keeping the Popen (unreaped until we wait on it) means the
# PID cannot be reused by another process while it is in this table.
CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
# Each server's watchdog (server PID -> watchdog): a small process that stops the server when
# this process ends however it ends (kill -9, os._exit of a test timeout, a crash), which
# atexit handlers and signal handlers cannot promise.
WATCHDOGS: dict[int, subprocess.Popen[bytes]] = {}

# The watchdog blocks reading a pipe only we hold the other end of: EOF means we are gone.
# It then stops the server with its graceful signal, and SIGKILL after a grace, but only
# while the PID is still the same process (its start time is checked: no PID reuse).
WATCHDOG = """
import os, signal, sys, time
pid, sig, grace = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
signal.signal(signal.SIGINT, signal.SIG_IGN)
def started():
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None
birth = started()
sys.stdin.buffer.read()
if birth is not None and started() == birth:
    try:
        os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while started() == birth and time.monotonic() < deadline:
            time.sleep(0.05)
        if started() == birth:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
"""


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be started or stopped; the message says why and names its log."""


class RunAs(NamedTuple):
    uid: int
    gid: int


def unprivileged_user() -> RunAs | None:
    """The user to run PostgreSQL as: None (ourselves) unless we are root."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam(RUN_AS_WHEN_ROOT)
    except KeyError as exc:
        raise EmbeddedServerError(f"running as root, PostgreSQL needs an unprivileged user "
                                  f"{RUN_AS_WHEN_ROOT!r}, which does not exist") from exc
    return RunAs(entry.pw_uid, entry.pw_gid)


def grant_search(path: Path) -> None:
    """Give others the search (x) bit on each ancestor of `path` lacking it."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            _log.info("chmod o+x %s so that user %s can reach %s", parent, RUN_AS_WHEN_ROOT, path)
            parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def ensure_owner(path: Path, run_as: RunAs) -> None:
    """chown -R `path` to `run_as` unless its top is already theirs."""
    st = path.stat()
    if (st.st_uid, st.st_gid) == run_as:
        return
    _log.info("chown -R %d:%d %s", run_as.uid, run_as.gid, path)
    os.chown(path, run_as.uid, run_as.gid)
    for top, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(top, name), run_as.uid, run_as.gid)


def server_env() -> dict[str, str]:
    env = client_env()
    env["LC_ALL"] = "C"
    return env


def client_env() -> dict[str, str]:
    """Our environment without PG* variables (a developer's PGPORT or PGDATA must not leak in)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def spawn(argv: list[str], *, cwd: Path, log: Path, run_as: RunAs | None) -> subprocess.Popen[bytes]:
    """Start a server in its own session (a Ctrl-C to the terminal reaches only us), output
    appended to `log`."""
    with open(log, "ab") as out:
        try:
            proc = subprocess.Popen(
                argv, cwd=cwd, env=server_env(), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True, umask=0o077,
                user=run_as.uid if run_as else None, group=run_as.gid if run_as else None,
                extra_groups=[] if run_as else None)
        except OSError as exc:
            raise EmbeddedServerError(f"could not execute {argv[0]}: {exc}") from exc
    CHILDREN[proc.pid] = proc
    graceful, grace = (signal.SIGINT, 10.0) if "postgres" in Path(argv[0]).name else (signal.SIGTERM, 10.0)
    WATCHDOGS[proc.pid] = subprocess.Popen(
        [sys.executable, "-c", WATCHDOG, str(proc.pid), str(int(graceful)), str(grace)],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    return proc


def processes_in(exe: Path, data_dir: Path) -> list[int]:
    """PIDs of live (non-zombie) processes running `exe` with `data_dir` as working directory:
    the servers of this data directory (PostgreSQL and Valkey chdir into it), children included."""
    reap()
    want_exe, want_cwd = os.path.realpath(exe), os.path.realpath(data_dir)
    found: list[int] = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if (proc.exe() == want_exe and proc.cwd() == want_cwd
                    and proc.status() != psutil.STATUS_ZOMBIE):
                found.append(int(proc.pid))
    return found


def is_alive(pid: int) -> bool:
    """Whether `pid` still runs. A child of ours is reaped (and forgotten) once it has exited; any
    other zombie counts as dead too (PID 1 may not reap orphans)."""
    child = CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del CHILDREN[pid]
        dismiss_watchdog(pid)
        return False
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def stop_server(exe: Path, data_dir: Path, pid: int,
                ladder: Sequence[tuple[signal.Signals, float]]) -> None:
    """Stop the server process of `data_dir` (any left running `exe` there, and `pid` if it
    is one we started), along `ladder`. Idempotent."""
    pids = processes_in(exe, data_dir)
    if pid in CHILDREN and pid not in pids:
        pids.append(pid)
    shut_down(pids, ladder)


def dismiss_watchdog(pid: int) -> None:
    """The server `pid` exited: its watchdog has nothing left to guard."""
    watchdog = WATCHDOGS.pop(pid, None)
    if watchdog is not None:
        watchdog.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            watchdog.wait(5)
        if watchdog.stdin is not None:
            watchdog.stdin.close()


def reap() -> None:
    """Reap our servers that have exited (killed by a test, crashed): their PIDs are zombies until
    then, and PostgreSQL takes a zombie named in postmaster.pid for a running server."""
    for pid in list(CHILDREN):
        is_alive(pid)


def shut_down(pids: Iterable[int], ladder: Sequence[tuple[signal.Signals, float]]) -> None:
    """Signal `pids` step by step until all have exited. Only the top processes (whose parent is
    not among `pids`) get the graceful signals: a postmaster stops its own children. A PID seen
    dead once is never signalled again (it may be reused)."""
    alive = [pid for pid in dict.fromkeys(pids) if is_alive(pid)]
    if alive:
        _log.info("stopping processes %s", alive)
    for sig, grace in ladder:
        if not alive:
            return
        for pid in alive if sig == signal.SIGKILL else tops(alive):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while True:
            alive = [pid for pid in alive if is_alive(pid)]
            if not alive or time.monotonic() > deadline:
                break
            time.sleep(POLL)
    if alive:
        raise EmbeddedServerError(f"processes {alive} did not exit")


def tops(pids: list[int]) -> list[int]:
    tops = []
    for pid in pids:
        try:
            parent = int(psutil.Process(pid).ppid())
        except psutil.Error:
            continue
        if parent not in pids:
            tops.append(pid)
    return tops


# ------------------------------------------------------------------------------------------ helpers


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def ensure_port_free(port: int) -> None:
    """Raise EmbeddedServerError if something listens on `port` (TIME_WAIT leftovers of a server
    that just stopped do not count: the servers bind with SO_REUSEADDR too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            raise EmbeddedServerError(f"port {port} on {HOST} is already in use: {exc}") from exc


def tail(log: Path, offset: int, limit: int = 4000) -> str:
    """What this start wrote to `log` (the last `limit` characters of it)."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError as exc:
        return f"(cannot read {log}: {exc})"
    return text[-limit:] or "(empty)"


def remove_tree(path: Path) -> None:
    """rm -rf `path` (a staging directory of ours)."""
    if path.exists():
        shutil.rmtree(path)
