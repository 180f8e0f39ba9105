"""Real `taskcast` processes, for the tests that stop, kill or supervise one."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from server.settings import Settings


def process_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a `taskcast` process on this test's database, Redis channel and
    no secret (anonymous clients), plus `extra`."""
    env = {**os.environ, "DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url,
           "TASKCAST_CHANNEL": settings.channel, "TASKCAST_LOG": "WARNING", **extra}
    env.pop("TASKCAST_SECRET", None)
    return env


def taskcast(settings: Settings, *args: str, env: dict[str, str] | None = None,
             **popen: Any) -> subprocess.Popen[bytes]:
    """`taskcast ARGS...` as a child process (stop it by its pid)."""
    return subprocess.Popen([sys.executable, "-m", "cli.main", *args],
                            env=env if env is not None else process_env(settings), **popen)
