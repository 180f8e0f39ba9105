"""The kind API: what a task kind is (`KindSpec`) and what its code sees of its task
(`TaskContext`, a Protocol that the runtime's `RunContext` implements).

Both the runtime (events/runtime.py) and the kinds (events/kinds/, plugins) import this
module, and it imports neither: the kinds never see the runtime's machinery, and the
runtime never imports a kind.

A kind's `run(ctx)` does its work as named steps, `await ctx.step(name, fn)`; each finished
step is a durable checkpoint, so a later attempt skips it and gets its recorded result
(invariant 5). `StepError` fails a step with a message (a `retryable` one may run again);
`TaskCancelled` is what `ctx.check_cancelled()` raises once a cancel was requested.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from events.ids import TaskId

if TYPE_CHECKING:
    from events.fold import View
    from events.log import EventLog

T = TypeVar("T")


class StepError(Exception):
    """Raised by a step to fail it with a message. A `retryable` one may run again."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class TaskCancelled(Exception):
    """Raised inside a kind when it looks at cancellation (`ctx.check_cancelled`)."""


class TaskContext(Protocol):
    """What a kind's code sees of its task."""

    task: TaskId
    scope: str
    attempt: int
    input: dict[str, Any]
    view: View
    workspace_root: str  # where scopes' directories are (events.kinds.workspace)
    log: EventLog

    @property
    def cancelled(self) -> asyncio.Event:
        """Set when a cancel (or the deadline) asks the task to stop."""

    def plan(self, steps: int) -> None:
        """Say how many steps the task has, so the view's overall progress means something."""

    def check_cancelled(self) -> None:
        """Raise TaskCancelled when a cancel was requested."""

    def result_of(self, name: str) -> Any:
        """The recorded result of a completed step (None when it did not complete)."""

    def completed(self, name: str) -> bool:
        """Whether the step `name` completed in an earlier attempt or this one."""

    async def step(self, name: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn` as the step `name`, unless a previous run completed it: then return the
        result it recorded. Raises what `fn` raises, after recording `step.failed`."""

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Report the current step's progress (0..1). Buffered: only the latest is written."""

    def output(self, lines: list[str]) -> None:
        """Append lines to the current step's output (buffered, bounded)."""

    async def ask(self, type_: str, prompt: str, *, options: list[str] | None = None) -> Any:
        """Ask a question and return its answer; the task is parked meanwhile, and a
        question is never asked twice."""


Run = Callable[[TaskContext], Coroutine[Any, Any, Any]]
Cleanup = Callable[[TaskContext], Awaitable[None]]
Validate = Callable[[Mapping[str, Any]], None]


@dataclass(frozen=True)
class KindSpec:
    """A kind: its `run(ctx)`, an optional `cleanup(ctx)` run after a cancel, a timeout or
    a failure, how many attempts a retryable failure gets, an optional queue `mutex` (jobs
    with the same one run one at a time), and an optional `validate(input)`: a cheap, pure
    check the node runs before the `create` is acked, raising `events.errors.BadRequest`
    naming the field (`input.steps`), so a task that can never run is refused at once.
    `max_running` caps how many tasks of the kind one worker runs at once, below its
    concurrency (None: only the concurrency): for kinds whose steps are processes."""

    name: str
    run: Run
    cleanup: Cleanup | None = None
    max_attempts: int = 3
    mutex: Callable[[dict[str, Any]], str | None] | None = None
    validate: Validate | None = None
    max_running: int | None = None

    def __post_init__(self) -> None:
        if self.max_running is not None and (not isinstance(self.max_running, int) or self.max_running < 1):
            raise ValueError(f"kind {self.name}: max_running must be a positive integer or None")


def as_kind(name: str, obj: object) -> KindSpec:
    """A KindSpec from a plugin's attribute. Raises TypeError."""
    if isinstance(obj, KindSpec):
        return obj
    if callable(obj):
        return KindSpec(name, obj)
    raise TypeError(f"{name} is neither a KindSpec nor an async function")
