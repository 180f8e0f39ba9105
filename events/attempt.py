"""Which task attempt a child process belongs to, and killing what an attempt left behind.

A step runs inside an `Owner` (set by `TaskContext.step` in a context variable): the task,
the claim's fencing token (a new one for every claim, so it names the attempt), and the
step. Every child a kind starts through `events.kinds.proc` carries it in its environment,
which all its descendants inherit:

    TASKCAST_TASK=<task id>  TASKCAST_FENCE=<fence>  TASKCAST_STEP=<step>
    TASKCAST_OWNER=<token of the worker process>   (absent for a child meant to outlive it)

A process's initial environment (/proc/PID/environ) cannot be set from outside, so a scan
by these markers never mistakes an unrelated process that got a reused pid for ours.
Two scans use them:
- `kill_leftovers(task, fence, step)`: before a step runs again on a later claim, every
  process of an earlier claim's run of that step is killed (invariant 5 re-runs the step;
  whatever the dead attempt left must not run beside it).
- `events.reaper`, a supervisor process per worker process: when the worker dies (even
  by kill -9, which runs no code of ours) it kills every process carrying its token.
"""

from __future__ import annotations

import contextvars
import os
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

TASK, FENCE, STEP, OWNER = "TASKCAST_TASK", "TASKCAST_FENCE", "TASKCAST_STEP", "TASKCAST_OWNER"
KILL_S = 5.0  # how long a scan keeps killing (a process may fork while it is killed)
POLL_S = 0.02


@dataclass(frozen=True)
class Owner:
    task: str
    fence: int
    step: str

    def env(self, *, bound: bool = True) -> dict[str, str]:
        """The markers for a child's environment; `bound`: it dies with this worker process."""
        markers = {TASK: self.task, FENCE: str(self.fence), STEP: self.step}
        if bound:
            markers[OWNER] = process_token()
        return markers


CURRENT: contextvars.ContextVar[Owner | None] = contextvars.ContextVar("taskcast_owner", default=None)
_token: tuple[int, str] | None = None


def process_token() -> str:
    """This process's owner token (a fork gets its own)."""
    global _token
    if _token is None or _token[0] != os.getpid():
        _token = (os.getpid(), f"{os.getpid()}-{secrets.token_hex(8)}")
    return _token[1]


def environ(proc: psutil.Process) -> dict[str, str]:
    try:
        found: dict[str, str] = proc.environ()
        return found
    except (psutil.Error, OSError):
        return {}


def scan(match: Callable[[dict[str, str]], bool]) -> list[psutil.Process]:
    """The live processes whose environment `match`es (this one excluded). Blocking."""
    me = os.getpid()
    found = []
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        if match(environ(proc)):
            found.append(proc)
    return found


def kill_matching(match: Callable[[dict[str, str]], bool], within_s: float = KILL_S) -> int:
    """SIGKILL every process whose environment `match`es, until none is left or `within_s`
    passed; how many were killed. Blocking: call it in a thread."""
    killed = 0
    until = time.monotonic() + within_s
    while (found := scan(match)) and time.monotonic() < until:
        for proc in found:
            try:
                os.kill(proc.pid, signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(POLL_S)
    return killed


def of_attempt(task: str, fence: int | None = None, step: str | None = None,
               *, other_fence: int | None = None) -> Callable[[dict[str, str]], bool]:
    """A matcher: processes of `task` (of claim `fence`, or of any claim but `other_fence`;
    of `step` when given)."""

    def match(env: dict[str, str]) -> bool:
        return (env.get(TASK) == task and (step is None or env.get(STEP) == step)
                and (fence is None or env.get(FENCE) == str(fence))
                and (other_fence is None or env.get(FENCE) != str(other_fence)))

    return match


def kill_leftovers(task: str, fence: int, step: str) -> int:
    """Kill what earlier claims of `task` left running of `step`. Blocking."""
    return kill_matching(of_attempt(task, step=step, other_fence=fence))
