"""The supervisor that kills a worker process's children once the worker is gone.

    python -m events.reaper TOKEN     (stdin: a pipe whose other end only the worker holds)

A worker killed with SIGKILL runs none of its own cleanup, and a parent-death signal
reaches only direct children (not `sleep` started by `sh`, nor git's helpers). So each
process that starts children first starts this one (`ensure`), in its own session so a
Ctrl-C to the terminal does not take it down first. It reads its stdin until end of file,
which the kernel delivers when the worker exits in any way, then kills every process whose
environment carries `TASKCAST_OWNER=TOKEN` (events.attempt), and exits.
"""

from __future__ import annotations

import os
import signal
import sys

from events import attempt

_started: tuple[int, int] | None = None  # (pid of the process that started it, write end)


def ensure() -> None:
    """Start this process's reaper unless it runs. Blocking, briefly (one spawn per process)."""
    global _started
    if _started is not None and _started[0] == os.getpid():
        return
    read_end, write_end = os.pipe()  # both close-on-exec: no child inherits the write end
    try:
        os.posix_spawn(sys.executable, [sys.executable, "-m", "events.reaper", attempt.process_token()],
                       _env(), file_actions=[(os.POSIX_SPAWN_DUP2, read_end, 0)], setsid=True)
    finally:
        os.close(read_end)
    _started = (os.getpid(), write_end)


def _env() -> dict[str, str]:
    keep = ("PATH", "PYTHONPATH", "VIRTUAL_ENV", "LANG")
    return {k: v for k, v in os.environ.items() if k in keep}


def main(argv: list[str]) -> int:
    token = argv[1]
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    while os.read(0, 4096):  # nothing is ever written: this waits for the worker to exit
        pass
    attempt.kill_matching(lambda env: env.get(attempt.OWNER) == token)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
