"""Running one claimed task: the context a kind's code sees, checkpoints, heartbeats,
cancellation, timeouts, questions and retries.

A kind's `run(ctx)` does its work as named steps, `await ctx.step(name, fn)`; each finished
step is a durable checkpoint (its result is in the `step.completed` event), so a later
claim skips it and gets the recorded result (invariant 5). A step runs as its claim's
`events.attempt.Owner`, which marks every child process it starts; a step that runs again
on a later claim first kills what the earlier claims' runs of it left (invariant 9). Progress and output are
buffered and written in batches, never an event per line.

Every write carries the claim's fencing token; the first write or heartbeat that finds the
lease lost stops the task at once, writing nothing more (invariant 3).

How a run ends:
- `run` returns: `task.completed`.
- it raises StepError(retryable) with attempts left: `task.retrying`, requeued after a
  backoff with jitter; any other error: the kind's cleanup, then `task.failed`.
- cancel requested (or the deadline passed): the step is signalled (`ctx.cancelled`), the
  run gets `cancel_grace_s` to stop by itself, then it is aborted; the kind's cleanup runs;
  then `task.cancelled` (or `task.timed_out`).
- `ctx.ask` with no recorded answer: `task.question`; the job is parked, holding no
  worker and no lease, until `answer` requeues it. The answer is then replayed.
- the lease is lost: nothing more is written; another worker resumes the task.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from events import attempt
from events.aio import Flag, pause, until
from events.errors import StaleFence, TaskcastError, Unavailable, VersionConflict
from events.fold import View
from events.ids import FenceToken, TaskId
from events.kind import KindSpec, StepError, TaskCancelled
from events.log import EventLog
from events.model import EventType, JobChange, NewEvent, Status
from events.queue import Claim

log = logging.getLogger("taskcast.runtime")
T = TypeVar("T")
E = EventType

BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0
MAX_PENDING_LINES = 1000  # output lines buffered between two flushes
MAX_PENDING_CHARS = 64 * 1024  # and their characters: a `step.output` event stays small
MAX_LINE_CHARS = 2000
MAX_DEADLINE_S = 10 * 365 * 24 * 3600.0
OUTAGE_RETRY_MIN_S = 0.05
OUTAGE_RETRY_MAX_S = 2.0


class LeaseLost(Exception):
    """The worker no longer owns the task; it must stop and write nothing."""


class _Parked(Exception):
    """The task asked a question and is parked until it is answered."""


class RunContext:
    """The runtime's TaskContext (events/kind.py): what a kind's code sees of its task."""

    def __init__(self, log_: EventLog, claim: Claim, *, worker: str, flush_s: float = 0.1,
                 lease_s: float = 30.0, workspace_root: str = "") -> None:
        self.log = log_
        self.lease_s = lease_s
        self.task = claim.task
        self.fence = claim.fence
        self.scope: str = claim.view.get("scope", "")
        self.workspace_root = workspace_root  # where scopes' directories are (events.kinds.workspace)
        self.attempt = claim.view.get("attempt", 1)
        self.worker = worker
        self.view: View = claim.view
        self.input: dict[str, Any] = claim.view.get("input") or {}
        self.cancelled = Flag()
        self.lost = Flag()  # the lease is gone (a write or a heartbeat found it): write nothing more
        self.lost_because = ""
        self.lease_ok_at = time.monotonic()  # when the lease was last known to be held
        self.flush_s = flush_s
        self.step_name: str | None = None
        self._total: int | None = None
        self._questions = 0
        self._pending_progress: NewEvent | None = None
        self._deferred: list[NewEvent] = []  # events to write with the next write
        self._completion_deferred = False  # a step.completed is among them
        self._pending_lines: list[str] = []
        self._pending_chars = 0
        self._write_lock = asyncio.Lock()
        self._flusher: asyncio.Handle | None = None
        self._flush_due = 0.0
        self._flushing: asyncio.Task[None] | None = None
        self._flush_again = False
        self._dropped_lines = 0
        if claim.cancel_requested or claim.view.get("cancel_requested"):
            self.cancelled.set()

    def lose(self, because: str) -> None:
        """The lease is gone: the run stops at once and writes nothing more."""
        if not self.lost.is_set():
            self.lost_because = because
            self.lost.set()

    # the API kinds use

    def plan(self, steps: int) -> None:
        """Say how many steps the task has, so the view's overall progress means something."""
        self._total = steps

    def check_cancelled(self) -> None:
        """Raise TaskCancelled when a cancel was requested."""
        if self.cancelled.is_set():
            raise TaskCancelled()

    def result_of(self, name: str) -> Any:
        """The recorded result of a completed step (None when it did not complete)."""
        for event in self._deferred:  # completed in this run, not committed yet
            if event.type is E.STEP_COMPLETED and event.data["step"] == name:
                return event.data.get("result")
        for step in self.view["steps"]:
            if step["name"] == name and step["status"] == "completed":
                return step.get("result")
        return None

    def completed(self, name: str) -> bool:
        return (any(e.type is E.STEP_COMPLETED and e.data["step"] == name for e in self._deferred)
                or any(s["name"] == name and s["status"] == "completed" for s in self.view["steps"]))

    async def step(self, name: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn` as the step `name`, unless a previous run completed it: then return the
        result it recorded. Raises what `fn` raises, after recording `step.failed`."""
        if self.completed(name):
            return self.result_of(name)  # type: ignore[no-any-return]
        self.check_cancelled()
        if self.fence > 1 or any(s["name"] == name for s in self.view["steps"]):
            # An earlier claim may have run it and died (its `step.started` may not have
            # been committed): nothing that run started may run beside this one.
            await asyncio.to_thread(attempt.kill_leftovers, self.task, self.fence, name)
        self.step_name = name
        started: dict[str, Any] = {"step": name, "worker": self.worker}
        if self._total is not None:
            started["steps_total"] = self._total
        # Not awaited: written at once by a flush, or, when the step is over first (a quick
        # one), in the same commit as its end. Either way before anything else of the task.
        self._deferred.append(NewEvent(E.STEP_STARTED, started))
        if self._completion_deferred:
            # Invariant 5: nothing runs after a step until its completion is committed (a
            # run that dies now must find the step completed, not run it again after its
            # successor began). Committed together with this step's start.
            await self.write([])
        else:
            self._schedule_flush(0)
        owner = attempt.CURRENT.set(attempt.Owner(self.task, self.fence, name))
        try:
            result = await fn()
        except StepError as exc:
            await self.write([NewEvent(E.STEP_FAILED, {"step": name, "error": str(exc),
                                                       "retryable": exc.retryable})])
            raise
        except (LeaseLost, _Parked, TaskCancelled, asyncio.CancelledError):
            raise
        except Exception as exc:
            await self.write([NewEvent(E.STEP_FAILED, {"step": name, "error": _message(exc),
                                                       "retryable": False})])
            raise
        finally:
            attempt.CURRENT.reset(owner)
        completed: dict[str, Any] = {"step": name}
        if result is not None:
            completed["result"] = result
        # Deferred too: committed before the next step starts, with the run's last events
        # when this was its last step (one commit fewer per task), or by a flush within
        # flush_s. Until then the step is not complete: a run that dies first runs it again.
        self._deferred.extend([*self._take_buffered(), NewEvent(E.STEP_COMPLETED, completed)])
        self._completion_deferred = True
        self.step_name = None
        if self._flusher is not None:  # the prompt flush of the start: no longer needed
            self._flusher.cancel()
            self._flusher = None
        self._schedule_flush()
        return result

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Report the current step's progress (0..1). Buffered: only the latest is written."""
        if self.step_name is None:
            raise RuntimeError("progress() outside a step")
        data: dict[str, Any] = {"step": self.step_name, "progress": max(0.0, min(1.0, fraction))}
        if message is not None:
            data["message"] = message[:MAX_LINE_CHARS].replace("\x00", "\ufffd")
        self._pending_progress = NewEvent(E.STEP_PROGRESS, data)
        self._schedule_flush()

    def output(self, lines: list[str]) -> None:
        """Append lines to the current step's output. Buffered and written in batches; at
        most MAX_PENDING_LINES lines of MAX_PENDING_CHARS characters wait for a flush (older
        ones are dropped, and counted), and a line is cut at MAX_LINE_CHARS (invariant 6)."""
        if self.step_name is None:
            raise RuntimeError("output() outside a step")
        for line in lines:
            line = line[:MAX_LINE_CHARS].replace("\x00", "\ufffd")  # jsonb cannot store NUL
            self._pending_lines.append(line)
            self._pending_chars += len(line)
        excess, count = 0, len(self._pending_lines)
        while excess < count and (count - excess > MAX_PENDING_LINES
                                  or self._pending_chars > MAX_PENDING_CHARS):
            self._pending_chars -= len(self._pending_lines[excess])
            excess += 1
        if excess:
            del self._pending_lines[:excess]
            self._dropped_lines += excess
        self._schedule_flush()

    async def ask(self, type_: str, prompt: str, *, options: list[str] | None = None) -> Any:
        """Ask a question and return its answer. The first time, this parks the task (no
        worker or lease is held while it waits); once answered, the task runs again and the
        recorded answer is returned here: a question is never asked twice."""
        self._questions += 1
        question = f"q_{self._questions}"
        answers = self.view.get("answers") or {}
        if question in answers:
            return answers[question]
        data: dict[str, Any] = {"question": question, "type": type_, "prompt": prompt}
        if options is not None:
            data["options"] = options
        await self.end([NewEvent(E.TASK_QUESTION, data)], job_state=JobChange.PARKED)
        raise _Parked(question)

    # writing

    def _schedule_flush(self, delay_s: float | None = None) -> None:
        """Flush in `delay_s` (default flush_s), unless one is due sooner already."""
        delay_s = self.flush_s if delay_s is None else delay_s
        loop = asyncio.get_running_loop()
        due = loop.time() + delay_s
        if self._flusher is not None:
            if self._flush_due <= due:
                return
            self._flusher.cancel()
        self._flusher, self._flush_due = loop.call_later(delay_s, self._start_flush), due

    def _start_flush(self) -> None:
        self._flusher = None
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush_quietly(), name=f"flush {self.task}")
        else:  # due while one is in flight (waiting for PostgreSQL, say): it goes round again
            self._flush_again = True

    async def close(self) -> None:
        """Stop the flush timer and await a flush in progress (the run is over)."""
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        if self._flushing is not None:
            self._flushing.cancel()
            await asyncio.gather(self._flushing, return_exceptions=True)

    async def _flush_quietly(self) -> None:
        self._flush_again = True
        try:
            while self._flush_again:
                self._flush_again = False
                await self.write([])
        except LeaseLost as exc:
            # A flush is the first to know (a deferred `step.started`): the step must stop
            # now, as when a heartbeat finds the lease gone, not run on for another owner.
            self.lose(str(exc))
        except TaskcastError as exc:
            log.debug("flush of %s failed: %s", self.task, exc)

    async def write(self, events: list[NewEvent], *, job_state: JobChange | None = None,
                    run_at: datetime | None = None) -> None:
        """Append buffered progress/output, then `events`, in one transaction.

        Raises LeaseLost when the fence is stale (nothing was written).
        """
        if self.lost.is_set():
            raise LeaseLost(self.lost_because)
        async with self._write_lock:
            if self._flusher is not None:
                self._flusher.cancel()
                self._flusher = None
            batch, self._deferred = [*self._deferred, *self._take_buffered(), *events], []
            self._completion_deferred = False
            if not batch:
                return
            outage_since: float | None = None
            delay = OUTAGE_RETRY_MIN_S
            while True:
                try:
                    if outage_since is not None and await self._committed(batch):
                        return  # the append before the outage did commit: never write it twice
                    self.view = await self.log.advance(self.task, self.view, batch, fence=self.fence,
                                                       job_state=job_state, run_at=run_at)
                    return
                except StaleFence as exc:
                    raise LeaseLost(str(exc)) from exc
                except VersionConflict:
                    # A command (cancel) appended meanwhile: fold on top of it.
                    self.view = await self.log.view(self.task)
                    if self.view.get("cancel_requested"):
                        self.cancelled.set()
                except Unavailable as exc:
                    # PostgreSQL is restarting or unreachable: wait for it and go on under
                    # the same fence. Past the lease another worker may own the task, and
                    # the fence would refuse us anyway: give up then.
                    now = time.monotonic()
                    outage_since = now if outage_since is None else outage_since
                    if now - outage_since > self.lease_s:
                        raise LeaseLost(f"PostgreSQL unavailable for longer than the lease: {exc}") from exc
                    log.warning("write of %s waits for PostgreSQL: %s", self.task, exc)
                    await pause(delay)
                    delay = min(delay * 2, OUTAGE_RETRY_MAX_S)

    def _take_buffered(self) -> list[NewEvent]:
        """The current step's buffered output and progress, as events (emptying the buffers)."""
        taken: list[NewEvent] = []
        if self._pending_lines and self.step_name is not None:
            lines = self._pending_lines
            if self._dropped_lines:
                lines = [f"[{self._dropped_lines} lines dropped]", *lines]
                self._dropped_lines = 0
            taken.append(NewEvent(E.STEP_OUTPUT, {"step": self.step_name, "lines": lines}))
        if self._pending_progress is not None and self.step_name is not None:
            taken.append(self._pending_progress)
        self._pending_lines, self._pending_progress, self._pending_chars = [], None, 0
        return taken

    async def end(self, events: list[NewEvent], *, job_state: JobChange,
                  run_at: datetime | None = None) -> None:
        """`write` the run's last events (terminal, retrying, parked), shielded: a cancel
        arriving meanwhile (a worker draining at SIGTERM) cannot cut the write between
        commit and return and leave the run's end unknown to this worker."""
        await asyncio.shield(self.write(events, job_state=job_state, run_at=run_at))

    async def _committed(self, batch: list[NewEvent]) -> bool:
        """After an outage cut an append off, whether it committed: the events after our
        view's version are exactly `batch`. Then the view is brought up to date."""
        stored = await self.log.history(self.task, self.view["version"], len(batch))
        if [(e.type, e.data) for e in stored] != [(e.type, e.data) for e in batch]:
            return False
        self.view = await self.log.view(self.task)
        return True


def _message(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def backoff_s(attempt: int) -> float:
    """Exponential backoff with full jitter for the `attempt`-th retry."""
    return random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (attempt - 1)))


def deadline(view: View) -> float | None:
    """Seconds left before the task's timeout, or None without one."""
    timeout_s = view.get("timeout_s")
    if not isinstance(timeout_s, int | float) or isinstance(timeout_s, bool):
        return None
    start = datetime.fromisoformat(view["deadline_from"].replace("Z", "+00:00"))
    # The edge allows at most 30 days; a larger value stored before it did is capped, not
    # an OverflowError that would crash the runner.
    seconds = min(float(timeout_s), MAX_DEADLINE_S)
    return (start + timedelta(seconds=seconds) - datetime.now(UTC)).total_seconds()


async def run_claim(log_: EventLog, claim: Claim, kind: KindSpec, *, worker: str,
                    lease_s: float, cancel_grace_s: float = 5.0, workspace_root: str = "",
                    on_context: Callable[[RunContext | None], None] | None = None) -> Status | None:
    """Run a claimed task until its run ends (or its lease is lost). Returns the terminal
    status it wrote, or None (parked, retrying, lease lost).

    The caller keeps the lease: `on_context` is given the run's context, which the worker's
    heartbeat (one query for all its tasks, events/worker.py) keeps alive, sets `cancelled`
    on when a cancel is requested, and `lose`s when the lease is gone."""
    ctx = RunContext(log_, claim, worker=worker, lease_s=lease_s, workspace_root=workspace_root)
    if on_context is not None:
        on_context(ctx)
    try:
        return await _run(ctx, kind, cancel_grace_s)
    except LeaseLost as exc:
        log.warning("stopped %s: %s", ctx.task, exc)
        return None
    except Exception as exc:
        # The runner itself failed (not the kind's code, whose errors fail the run in
        # _finish): end the task now rather than leave it to lease expiry (invariant 9).
        log.exception("the runner of %s crashed; failing the task", ctx.task)
        return await _fail_crashed(ctx, exc)
    finally:
        await ctx.close()
        if on_context is not None:
            on_context(None)


async def _fail_crashed(ctx: RunContext, exc: Exception) -> Status | None:
    """Write `task.failed` for a run whose runner crashed. Returns FAILED, or None when
    even that cannot be written (the lease is lost, or the task moved on)."""
    failed: dict[str, Any] = {"error": f"internal error in the worker: {_message(exc)}"[:1000]}
    if ctx.step_name is not None:
        failed["step"] = ctx.step_name
    try:
        await ctx.end([NewEvent(E.TASK_FAILED, failed)], job_state=JobChange.DONE)
    except (LeaseLost, TaskcastError) as second:
        log.warning("cannot fail %s after its runner crashed: %s", ctx.task, second)
        return None
    except Exception:
        log.exception("cannot fail %s after its runner crashed", ctx.task)
        return None
    return Status.FAILED


async def _run(ctx: RunContext, kind: KindSpec, cancel_grace_s: float) -> Status | None:
    if ctx.view["status"] in (Status.QUEUED, Status.RETRYING):
        await ctx.write([NewEvent(E.TASK_STARTED, {"worker": ctx.worker, "attempt": ctx.attempt})])
    timed_out = asyncio.Event()
    left = deadline(ctx.view)
    timer = None
    if left is not None:
        def expire() -> None:
            timed_out.set()
            ctx.cancelled.set()

        timer = asyncio.get_running_loop().call_later(max(left, 0), expire)
    main = asyncio.create_task(kind.run(ctx), name=f"{kind.name} {ctx.task}")
    try:
        await until(main, ctx.cancelled, ctx.lost)
        if ctx.lost.is_set():
            raise LeaseLost(ctx.lost_because)
        if ctx.cancelled.is_set() and not main.done():
            # Cancel (or timeout): the step was signalled through ctx.cancelled; give it a
            # grace period to stop by itself, then abort it.
            await until(main, ctx.lost, timeout_s=cancel_grace_s)
            if ctx.lost.is_set():
                raise LeaseLost(ctx.lost_because)
            if not main.done():
                main.cancel()
            await asyncio.gather(main, return_exceptions=True)
        if ctx.cancelled.is_set():
            if kind.cleanup is not None:
                await _cleanup(ctx, kind)
            if timed_out.is_set():
                await ctx.end([NewEvent(E.TASK_TIMED_OUT, {"reason": "timeout"})], job_state=JobChange.DONE)
                return Status.TIMED_OUT
            reason = ctx.view.get("error") or "cancelled"
            await ctx.end([NewEvent(E.TASK_CANCELLED, {"reason": reason})], job_state=JobChange.DONE)
            return Status.CANCELLED
        return await _finish(ctx, kind, main)
    finally:
        if timer is not None:
            timer.cancel()
        main.cancel()
        await asyncio.gather(main, return_exceptions=True)


async def _finish(ctx: RunContext, kind: KindSpec, main: asyncio.Task[Any]) -> Status | None:
    exc = main.exception()
    if exc is None:
        await ctx.end([NewEvent(E.TASK_COMPLETED, {"result": main.result()})], job_state=JobChange.DONE)
        return Status.COMPLETED
    if isinstance(exc, _Parked):
        return None
    if isinstance(exc, LeaseLost):
        raise exc
    if isinstance(exc, StepError) and exc.retryable and ctx.attempt < kind.max_attempts:
        delay = backoff_s(ctx.attempt)
        await ctx.end([NewEvent(E.TASK_RETRYING, {"attempt": ctx.attempt + 1, "delay_s": round(delay, 3),
                                                    "reason": str(exc)})],
                        job_state=JobChange.QUEUED, run_at=datetime.now(UTC) + timedelta(seconds=delay))
        return None
    failed: dict[str, Any] = {"error": _message(exc)}
    if ctx.step_name is not None:
        failed["step"] = ctx.step_name
    if not isinstance(exc, StepError | TaskcastError):
        log.error("task %s failed", ctx.task, exc_info=exc)
    if kind.cleanup is not None:
        await _cleanup(ctx, kind)  # nothing a step started may outlive the run
    await ctx.end([NewEvent(E.TASK_FAILED, failed)], job_state=JobChange.DONE)
    return Status.FAILED


async def _cleanup(ctx: RunContext, kind: KindSpec) -> None:
    assert kind.cleanup is not None
    try:
        async with asyncio.timeout(30):
            await kind.cleanup(ctx)
    except Exception:
        log.exception("cleanup of %s failed", ctx.task)


async def cleanup_abandoned(log_: EventLog, view: View, kind: KindSpec, *, worker: str,
                            workspace_root: str = "") -> None:
    """Run a kind's cleanup for a task whose worker is gone. The context holds no lease
    (fence 0), so the cleanup can write nothing to the task."""
    if kind.cleanup is None:
        return
    claim = Claim(TaskId(view["id"]), FenceToken(0), view.get("attempt", 1), True, view)
    await _cleanup(RunContext(log_, claim, worker=worker, workspace_root=workspace_root), kind)
