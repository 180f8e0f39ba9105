"""`taskcast create` and `taskcast watch`: tasks followed live in a terminal.

Both talk to a running server over its websocket, through `cli.client.Follower` (the
public protocol only), so they survive a server restart: the follower reconnects and
resumes with `since`, and nothing is printed twice.

What is shown: every event a person cares about as one line (steps starting, completing
with their duration, failing; output; questions; the end), also when stdout is not a
terminal; on a terminal, a live panel under those lines with a progress bar per step.
`Board` is the pure part: it keeps the latest view of each task and turns updates into
lines and the panel; `Screen` prints them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from datetime import datetime
from typing import Any

import orjson
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from cli.client import TERMINAL, Follower, Frame, Refused, RequestFailed, Update

PANEL_TASKS = 8  # tasks shown in the live panel (the most recently updated)
STATUS_STYLES = {"completed": "green", "failed": "red", "cancelled": "yellow", "timed_out": "red",
                 "running": "cyan", "waiting_answer": "magenta", "retrying": "yellow",
                 "queued": "blue", "waiting": "blue"}
STEP_ICONS = {"completed": ("✔", "green"), "failed": ("✖", "red"), "running": ("●", "cyan"),
              "pending": ("○", "dim"), "cancelled": ("⊘", "yellow"), "timed_out": ("!", "red")}


def _when(at: str | None) -> datetime | None:
    return datetime.fromisoformat(at.replace("Z", "+00:00")) if at else None


def seconds_between(start: str | None, end: str | None) -> float | None:
    """Seconds from one ISO timestamp to another (None when either is missing)."""
    a, b = _when(start), _when(end)
    return None if a is None or b is None else (b - a).total_seconds()


def _step(view: Frame, name: Any) -> Frame:
    return next((s for s in view.get("steps", []) if s.get("name") == name), {})


def event_text(update: Update) -> str | None:
    """The line for one event (without time and task), or None for those not worth one."""
    kind: str = update.event["type"]
    data: Frame = update.event.get("data") or {}
    view = update.task
    step = data.get("step")
    if kind == "task.created":
        return f"created {view.get('kind')} in {view.get('scope')} ({view.get('status')})"
    if kind == "task.started":
        resumed = any(s.get("status") == "completed" for s in view.get("steps", []))
        return f"{'resumed' if resumed else 'started'} (attempt {view.get('attempt', 1)})"
    if kind == "step.started":
        return f"{step} started"
    if kind == "step.output":
        return "\n".join(f"{step} | {line}" for line in data.get("lines", []))
    if kind == "step.completed":
        took = seconds_between(_step(view, step).get("started_at"), update.event.get("at"))
        return f"{step} completed" + (f" in {took:.2f} s" if took is not None else "")
    if kind == "step.failed":
        return f"{step} failed: {data.get('error')}"
    if kind == "task.question":
        options = "/".join(str(o) for o in data.get("options") or [])
        return (f"? {data.get('prompt')}" + (f" [{options}]" if options else "")
                + f" (question {data.get('question')}: answer it in the dashboard)")
    if kind == "task.answered":
        return f"answered {data.get('question')}: {orjson.dumps(data.get('answer')).decode()}"
    if kind == "task.cancel_requested":
        return "cancel requested"
    if kind == "task.retrying":
        return f"retrying (attempt {data.get('attempt')}): {data.get('reason')}"
    if kind == "task.completed":
        return f"completed: {orjson.dumps(data.get('result')).decode()}"
    if kind in ("task.failed", "task.cancelled", "task.timed_out"):
        why = data.get("error") or data.get("reason")
        return kind.split(".", 1)[1] + (f": {why}" if why else "")
    return None


class Board:
    """The tasks being followed: their latest views, as lines and a live panel. Pure."""

    def __init__(self) -> None:
        self.views: dict[str, Frame] = {}
        self.status = ""  # the connection's trouble, if any, shown under the tasks

    def know(self, view: Frame) -> None:
        self.views.pop(view["id"], None)
        self.views[view["id"]] = view  # last updated last: the panel shows the newest

    def apply(self, update: Update) -> Text | None:
        """Record an update; the line to print for it (or None)."""
        self.know(update.task)
        text = event_text(update)
        if text is None:
            return None
        at = _when(update.event.get("at"))
        clock = at.astimezone().strftime("%H:%M:%S") if at else ""
        status = update.task.get("status", "")
        style = "bold " + STATUS_STYLES[status] if update.event["type"].startswith("task.") \
            and status in TERMINAL else ""
        return Text.assemble((clock + " ", "dim"), (update.event["task"] + " ", "dim"), (text, style))

    def summary(self, view: Frame) -> Text:
        """One line: id, kind, scope, status, current step."""
        status = view.get("status", "")
        return Text.assemble((view["id"] + " ", "bold"), f"{view.get('kind')}  {view.get('scope')}  ",
                             (status, STATUS_STYLES.get(status, "")),
                             f"  {view.get('step') or ''}".rstrip())

    def render(self) -> RenderableType:
        """The live panel: each recent task with its overall progress and a bar per step."""
        parts: list[RenderableType] = []
        for view in list(self.views.values())[-PANEL_TASKS:]:
            progress = float(view.get("progress") or 0)
            head = Table.grid(padding=(0, 1))
            head.add_row(self.summary(view), ProgressBar(1.0, progress, width=20),
                         Text(f"{round(100 * progress)}%"))
            steps = Table.grid(padding=(0, 1))
            steps.add_column(width=3, justify="right")
            steps.add_column(min_width=12, no_wrap=True)
            steps.add_column(width=24)
            steps.add_column()
            for step in view.get("steps", []):
                icon, style = STEP_ICONS.get(step.get("status", ""), ("·", "dim"))
                steps.add_row(Text(icon, style), Text(str(step.get("name"))),
                              ProgressBar(1.0, float(step.get("progress") or 0), width=24),
                              Text(self._step_detail(step), style="red" if step.get("error") else "dim"))
            total = view.get("steps_total")  # an optional field: how many steps were planned
            if isinstance(total, int) and total > len(view.get("steps", [])):
                steps.add_row(Text("○", "dim"), Text(f"{total - len(view['steps'])} more pending", "dim"),
                              Text(""), Text(""))
            for question in view.get("questions", []):
                options = " / ".join(str(o) for o in question.get("options") or [])
                steps.add_row(Text("?", "bold magenta"), Text(str(question.get("prompt")), "magenta"),
                              Text(options, "magenta"), Text("answer it in the dashboard", "dim"))
            parts += [head, steps]
        if self.status:
            parts.append(Text(self.status, style="yellow"))
        return Group(*parts)

    @staticmethod
    def _step_detail(step: Frame) -> str:
        if step.get("status") == "failed":
            return f"failed: {step.get('error')}"
        if step.get("status") == "completed":
            took = seconds_between(step.get("started_at"), step.get("ended_at"))
            return f"{took:.2f} s" if took is not None else ""
        if step.get("status") in ("cancelled", "timed_out"):
            return str(step["status"]).replace("_", " ")
        return str(step.get("message") or "")


class Screen:
    """Prints the board's lines, keeps the live panel current (on a terminal), and says when
    to stop: when `task` (if any) has ended."""

    def __init__(self, console: Console, *, task: str | None, until_acked: bool = False) -> None:
        self.console = console
        self.until_acked = until_acked
        self.board = Board()
        self.task = task
        self.live: Live | None = None
        if console.is_terminal:
            self.live = Live(self.board.render(), console=console, auto_refresh=False, transient=False)
        else:
            console.soft_wrap = True  # piped: one event, one line, however long

    def __enter__(self) -> Screen:
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.stop()

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.update(self.board.render(), refresh=True)

    @property
    def final_status(self) -> str | None:
        view = self.board.views.get(self.task or "")
        status = view.get("status") if view else None
        return status if status in TERMINAL else None

    def created(self, ack: Frame) -> bool:
        self.task = ack["task"]
        self.console.print(f"created task {ack['task']} ({ack['status']})", highlight=False)
        return self.until_acked

    def subscribed(self, views: list[Frame]) -> bool:
        for view in views:
            self.board.know(view)
            self.console.print(self.board.summary(view), highlight=False)
        self._refresh()
        return self.final_status is not None

    def update(self, update: Update) -> bool:
        line = self.board.apply(update)
        if line is not None:
            self.console.print(line, highlight=False)
        self._refresh()
        return self.final_status is not None

    def connection(self, state: str, detail: str = "") -> None:
        """One line when the connection is lost and one when it is back; meanwhile each try
        is shown under the panel (on a terminal)."""
        if state == "connected":
            if self.board.status:
                self.console.print("reconnected; resuming where it stopped", style="green")
            self.board.status = ""
        else:
            if not self.board.status:
                self.console.print(f"connection lost ({detail}); reconnecting", style="yellow")
            self.board.status = f"reconnecting: {detail}"
        self._refresh()


async def _follow(follower: Follower, screen: Screen) -> int:
    with screen:
        await follower.run(screen)
    return 0 if screen.until_acked or screen.final_status == "completed" else 1


def _run(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop (as the server does) where it exists; errors as exit codes."""
    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover
            return asyncio.run(coro)
        return uvloop.run(coro)  # type: ignore[no-any-return]
    except (Refused, RequestFailed) as exc:
        Console(stderr=True).print(f"taskcast: {exc}", style="red", highlight=False)
        return 2
    except KeyboardInterrupt:
        return 130


def create(url: str, token: str | None, *, kind: str, input_: object, scope: str,
           watch: bool, console: Console | None = None) -> int:
    """`taskcast create`: 0 once acked (with `watch`: once the task completed; 1 when it
    ended otherwise); 2 when the server refused it."""
    console = console or Console()
    if not isinstance(input_, dict):
        Console(stderr=True).print("taskcast create: --input must be a JSON object", style="red")
        return 2
    follower = Follower(url, token=token, create={"kind": kind, "scope": scope, "input": input_})
    return _run(_follow(follower, Screen(console, task=None, until_acked=not watch)))


def watch(url: str, token: str | None, *, task: str | None = None, scope: str | None = None,
          console: Console | None = None) -> int:
    """`taskcast watch`: one task until it ends (0 when it completed, else 1), or a scope
    until Ctrl-C; 2 when the server refused (e.g. `not_found`)."""
    console = console or Console()
    channel = f"task:{task}" if task else f"scope:{scope}"
    follower = Follower(url, token=token, channel=channel, snapshot=True)
    return _run(_follow(follower, Screen(console, task=task)))
