"""Child processes for kinds: started in their own process group, read line by line, and
never outliving the step that started them.

`run` starts argv with `start_new_session=True` (so the process and everything it spawns
share one group), reads stdout and stderr as lines (a line ends at "\\n" or, for progress
meters such as git's, at "\\r"), and kills the group on every way out:
- the process exits: stragglers it left in its group (a backgrounded child) are killed;
- `cancelled` is set: the group gets SIGTERM, then SIGKILL after `TERM_GRACE_S`, and
  TaskCancelled is raised;
- the awaiting task is cancelled (the runtime aborts a step past its grace): SIGKILL.
So a kind whose processes all go through here needs no cleanup hook for them.

Each child also belongs to its task attempt (`events.attempt`): its environment carries the
markers of the step that runs it, so the worker's reaper kills it if the worker dies, and a
later claim re-running the step kills it before it starts again. `bound=False` leaves out
the worker's token, for a process meant to outlive the worker (provision's agent).
"""

from __future__ import annotations

import asyncio
import codecs
import os
import re
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import psutil

from events import attempt, reaper
from events.kind import TaskCancelled

TERM_GRACE_S = 1.0  # from SIGTERM to SIGKILL on cancel (on SIGTERM git removes its lock files)
LINE_MAX_CHARS = 2000  # a longer line is cut: output is bounded whatever a process prints
CAPTURE_MAX_CHARS = 1_000_000  # of each stream kept for the caller
READ_BYTES = 64 * 1024
DRAIN_S = 2.0  # reading the output left in the pipes once the process exited

T = TypeVar("T")
OnLine = Callable[[str, bool], None]  # (line, is a progress line ended by "\r")
_LINE_END = re.compile(rb"[\r\n]")


@dataclass(frozen=True)
class Finished:
    code: int
    stdout: str
    stderr: str

    def last_error(self) -> str:
        """The last non-empty line of stderr (or stdout): what to put in an error message."""
        for text in (self.stderr, self.stdout):
            lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
            if lines:
                return lines[-1]
        return f"exit status {self.code}"


def gone(pid: int) -> bool:
    """Whether process `pid` has ended (a zombie nobody reaped yet counts as ended)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


async def wait_gone(pid: int, within_s: float) -> bool:
    """Wait up to `within_s` for process `pid` to end; whether it did."""
    loop = asyncio.get_running_loop()
    until = loop.time() + within_s
    while not await asyncio.to_thread(gone, pid):
        if loop.time() >= until:
            return False
        await asyncio.sleep(0.05)
    return True


def kill_group(pgid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Signal a process group; a group that is already gone is fine."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def owned_env(env: Mapping[str, str] | None, *, bound: bool = True) -> dict[str, str]:
    """`env` (default: this process's) with the markers of the current step's attempt."""
    owned = dict(os.environ if env is None else env)
    for marker in (attempt.TASK, attempt.FENCE, attempt.STEP, attempt.OWNER):
        owned.pop(marker, None)
    owner = attempt.CURRENT.get()
    if owner is not None:
        owned.update(owner.env(bound=bound))
    return owned


async def run(argv: Sequence[str], *, cwd: str | None = None, env: Mapping[str, str] | None = None,
              cancelled: asyncio.Event | None = None, on_line: OnLine | None = None,
              merge_stderr: bool = False, bound: bool = True, pass_fds: Sequence[int] = ()) -> Finished:
    """Run argv to its end. Raises TaskCancelled when `cancelled` is set first, and
    OSError when it cannot be started."""
    if cancelled is not None and cancelled.is_set():
        raise TaskCancelled()
    reaper.ensure()
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=owned_env(env, bound=bound), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT if merge_stderr else asyncio.subprocess.PIPE,
        start_new_session=True, pass_fds=tuple(pass_fds))
    assert proc.stdout is not None
    out: list[str] = []
    err: list[str] = []
    pumps = [asyncio.create_task(_pump(proc.stdout, out, on_line))]
    if proc.stderr is not None:
        pumps.append(asyncio.create_task(_pump(proc.stderr, err, on_line)))
    try:
        try:
            code = await (proc.wait() if cancelled is None else until_cancelled(cancelled, proc.wait()))
        except TaskCancelled:
            kill_group(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), TERM_GRACE_S)
            except TimeoutError:
                pass
            raise
        # Whatever the process left running in its group would hold our pipes open; one
        # that left the group (setsid) may still hold them: read on for DRAIN_S at most.
        kill_group(proc.pid)
        await asyncio.wait(pumps, timeout=DRAIN_S)
        for pump in pumps:
            if pump.done():
                pump.result()  # an error of on_line is the caller's
        return Finished(code, "".join(out), "".join(err))
    finally:
        kill_group(proc.pid)
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        if proc.returncode is None:
            await asyncio.shield(proc.wait())


async def until_cancelled(cancelled: asyncio.Event, work: Awaitable[T]) -> T:
    """Await `work`; when `cancelled` is set first, cancel it and raise TaskCancelled."""
    if cancelled.is_set():
        raise TaskCancelled()
    task = asyncio.ensure_future(work)
    stop = asyncio.create_task(cancelled.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in (task, stop):
            if not waiter.done():
                waiter.cancel()
        await asyncio.gather(task, stop, return_exceptions=True)
    if task.cancelled():
        raise TaskCancelled()
    return task.result()


async def _pump(stream: asyncio.StreamReader, keep: list[str], on_line: OnLine | None) -> None:
    """Read `stream` to its end: keep its text (bounded) and hand each line to `on_line`."""
    kept = 0
    pending = b""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a char may span chunks
    while chunk := await stream.read(READ_BYTES):
        text = decoder.decode(chunk)
        if kept < CAPTURE_MAX_CHARS:
            keep.append(text[:CAPTURE_MAX_CHARS - kept])
            kept += len(keep[-1])
        if on_line is None:
            continue
        pending += chunk
        start = 0
        for end in _LINE_END.finditer(pending):
            line = pending[start:end.start()].decode(errors="replace")
            start = end.end()
            if line:
                on_line(line[:LINE_MAX_CHARS], end.group() == b"\r")
        pending = pending[start:]
        if len(pending) > LINE_MAX_CHARS * 4:  # a line without end: cut it rather than grow
            on_line(pending[:LINE_MAX_CHARS].decode(errors="replace"), False)
            pending = b""
    if on_line is not None and pending:
        on_line(pending.decode(errors="replace")[:LINE_MAX_CHARS], False)
