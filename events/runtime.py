"""Running one claimed task: the context a kind's code sees, checkpoints, heartbeats.

A kind is `async def kind(ctx: TaskContext) -> result`. It runs its work as named steps,
`await ctx.step(name, fn)`; each finished step is a durable checkpoint (its result is in
the `step.completed` event), so after a crash the next claim skips it and returns the
recorded result (invariant 5). Progress and output are buffered and written in batches,
never an event per line.

Every write carries the claim's fencing token; the first write or heartbeat that finds the
lease lost stops the task at once (invariant 3).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from events.errors import StaleFence, TaskcastError, VersionConflict
from events.fold import View
from events.log import EventLog
from events.model import EventType, NewEvent, Status
from events.queue import Claim, Queue

log = logging.getLogger("taskcast.runtime")
T = TypeVar("T")
E = EventType


class LeaseLost(Exception):
    """The worker no longer owns the task; it must stop and write nothing."""


class StepError(Exception):
    """Raised by a step to fail it with a message. `retryable` steps may run again."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class TaskContext:
    """What a kind's code sees of its task."""

    def __init__(self, log_: EventLog, claim: Claim, *, worker: str, flush_s: float = 0.1) -> None:
        self.log = log_
        self.task = claim.task
        self.fence = claim.fence
        self.worker = worker
        self.view: View = claim.view
        self.input: dict[str, Any] = claim.view.get("input") or {}
        self.cancelled = asyncio.Event()
        self.flush_s = flush_s
        self._step: str | None = None
        self._total: int | None = None
        self._pending_progress: NewEvent | None = None
        self._pending_lines: list[str] = []
        self._write_lock = asyncio.Lock()
        self._flusher: asyncio.TimerHandle | None = None

    def plan(self, steps: int) -> None:
        """Say how many steps the task has, so the view's overall progress means something."""
        self._total = steps

    async def step(self, name: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn` as the step `name`, unless a previous run completed it: then return the
        result it recorded. Raises what `fn` raises, after recording `step.failed`."""
        for done in self.view["steps"]:
            if done["name"] == name and done["status"] == "completed":
                return done.get("result")  # type: ignore[no-any-return]
        self._step = name
        started: dict[str, Any] = {"step": name}
        if self._total is not None:
            started["steps_total"] = self._total
        await self.write([NewEvent(E.STEP_STARTED, started)])
        try:
            result = await fn()
        except StepError as exc:
            await self.write([NewEvent(E.STEP_FAILED, {"step": name, "error": str(exc),
                                                       "retryable": exc.retryable})])
            raise
        except (LeaseLost, asyncio.CancelledError):
            raise
        except Exception as exc:
            await self.write([NewEvent(E.STEP_FAILED, {"step": name, "error": _message(exc),
                                                       "retryable": False})])
            raise
        completed: dict[str, Any] = {"step": name}
        if result is not None:
            completed["result"] = result
        await self.write([NewEvent(E.STEP_COMPLETED, completed)])
        self._step = None
        return result

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Report the current step's progress (0..1). Buffered: only the latest is written."""
        if self._step is None:
            raise RuntimeError("progress() outside a step")
        data: dict[str, Any] = {"step": self._step, "progress": max(0.0, min(1.0, fraction))}
        if message is not None:
            data["message"] = message
        self._pending_progress = NewEvent(E.STEP_PROGRESS, data)
        self._schedule_flush()

    def output(self, lines: list[str]) -> None:
        """Append lines to the current step's output. Buffered and written in batches."""
        if self._step is None:
            raise RuntimeError("output() outside a step")
        self._pending_lines.extend(lines)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flusher is None:
            loop = asyncio.get_running_loop()
            self._flusher = loop.call_later(self.flush_s, lambda: loop.create_task(self.flush()))

    async def flush(self) -> None:
        """Write buffered progress and output now."""
        await self.write([])

    async def write(self, events: list[NewEvent], *, job_state: str | None = None) -> None:
        """Append buffered progress/output, then `events`, in one transaction.

        Raises LeaseLost when the fence is stale (nothing was written).
        """
        async with self._write_lock:
            if self._flusher is not None:
                self._flusher.cancel()
                self._flusher = None
            batch: list[NewEvent] = []
            if self._pending_lines and self._step is not None:
                batch.append(NewEvent(E.STEP_OUTPUT, {"step": self._step, "lines": self._pending_lines}))
            if self._pending_progress is not None:
                batch.append(self._pending_progress)
            self._pending_lines, self._pending_progress = [], None
            batch.extend(events)
            if not batch:
                return
            while True:
                try:
                    self.view, _ = await self.log.append(
                        self.task, self.view, batch, fence=self.fence, job_state=job_state)
                    return
                except StaleFence as exc:
                    raise LeaseLost(str(exc)) from exc
                except VersionConflict:
                    # A command (cancel, answer) appended meanwhile: fold on top of it.
                    self.view = await self.log.view(self.task)


def _message(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def run_claim(log_: EventLog, queue: Queue, claim: Claim, kind: Callable[[TaskContext], Awaitable[Any]],
                    *, worker: str, lease_s: float) -> None:
    """Run a claimed task to its end (or until its lease is lost), heartbeating meanwhile."""
    ctx = TaskContext(log_, claim, worker=worker)

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(lease_s / 3)
            flag = await queue.heartbeat(ctx.task, ctx.fence, lease_s)
            if flag is None:
                raise LeaseLost(f"lease of {ctx.task} lost")
            if flag:
                ctx.cancelled.set()

    async def body() -> None:
        if Status(ctx.view["status"]) in (Status.QUEUED, Status.RETRYING):
            await ctx.write([NewEvent(E.TASK_STARTED, {"worker": worker, "attempt": claim.attempt})])
        try:
            result = await kind(ctx)
        except (LeaseLost, asyncio.CancelledError):
            raise
        except Exception as exc:
            failed: dict[str, Any] = {"error": _message(exc)}
            if ctx._step is not None:
                failed["step"] = ctx._step
            if not isinstance(exc, StepError | TaskcastError):
                log.exception("task %s failed", ctx.task)
            await ctx.write([NewEvent(E.TASK_FAILED, failed)], job_state="done")
            return
        await ctx.write([NewEvent(E.TASK_COMPLETED, {"result": result})], job_state="done")

    try:
        async with asyncio.TaskGroup() as tg:
            main = tg.create_task(body())
            beat = tg.create_task(heartbeat())
            main.add_done_callback(lambda _: beat.cancel())
    except* LeaseLost as group:
        log.warning("stopped %s: %s", ctx.task, group.exceptions[0])
