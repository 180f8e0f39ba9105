"""The projection: `apply(view, event) -> view`, a pure fold.

The same function updates the stored projection at append time and rebuilds any view from
its history, so the two can never disagree. Views are plain JSON-ready dicts shaped as
PROTOCOL.md's task view; `apply` never mutates its input.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from events.ids import TaskId
from events.model import EventType, Status, initial_status, next_status

View = dict[str, Any]
_STATUSES = {s.value: s for s in Status}  # a dict lookup: Status(value) costs ten times more
OUTPUT_TAIL_LINES = 50

E = EventType


def created_view(task: TaskId, data: dict[str, Any], at: str) -> View:
    """The view after `task.created` (version 1)."""
    return {
        "id": task,
        "kind": data["kind"],
        "scope": data["scope"],
        "status": initial_status(data.get("depends_on") or []).value,
        "step": None,
        "steps": [],
        "progress": 0.0,
        "output_tail": [],
        "questions": [],
        "result": None,
        "error": None,
        "labels": list(data.get("labels") or []),
        "depends_on": list(data.get("depends_on") or []),
        "priority": data.get("priority", 0),
        "timeout_s": data.get("timeout_s"),
        "input": data.get("input", {}),
        "attempt": 1,
        "cancel_requested": False,
        "created_at": at,
        "updated_at": at,
        "deadline_from": at,  # timeout_s counts from here (the start of the current run)
        "answers": {},
        "version": 1,
        "position": None,
    }


def apply(view: View | None, task: TaskId, version: int, type_: EventType,
          data: dict[str, Any], at: str) -> View:
    """The view after one event. Raises IllegalTransition for an event the FSM forbids,
    and ValueError for a version that does not follow the view's."""
    if view is None:
        if type_ is not E.TASK_CREATED or version != 1:
            raise ValueError(f"the first event of a task is task.created at version 1, not {type_}")
        return created_view(task, data, at)
    if version != view["version"] + 1:
        raise ValueError(f"version {version} does not follow {view['version']}")
    status = next_status(_STATUSES[view["status"]], type_)
    new = dict(view)
    new["status"] = status.value
    new["version"] = version
    new["updated_at"] = at
    _FOLDS.get(type_, _nothing)(new, data, at)
    return new


def rebuild(task: TaskId, events: Iterable[tuple[int, EventType, dict[str, Any], str]]) -> View | None:
    """The view after a task's whole history of (version, type, data, at)."""
    view: View | None = None
    for version, type_, data, at in events:
        view = apply(view, task, version, type_, data, at)
    return view


def _nothing(view: View, data: dict[str, Any], at: str) -> None:
    pass


def _step(view: View, name: str) -> dict[str, Any]:
    """The (copied, writable) step called `name`, appended when new."""
    steps = list(view["steps"])
    view["steps"] = steps
    for i, step in enumerate(steps):
        if step["name"] == name:
            steps[i] = dict(step)
            return steps[i]  # type: ignore[no-any-return]
    step = {"name": name, "status": "pending", "attempt": 0}
    steps.append(step)
    return step


def _overall(view: View, current: float) -> float:
    total = view.get("steps_total")
    if not total:
        return float(current)
    done = [s["status"] for s in view["steps"]].count("completed")
    return float(min(1.0, round((done + current) / total, 4)))


def _task_started(view: View, data: dict[str, Any], at: str) -> None:
    view["started_at"] = at


def _step_started(view: View, data: dict[str, Any], at: str) -> None:
    step = _step(view, data["step"])
    step.update(status="running", attempt=step["attempt"] + 1, started_at=at, progress=0.0)
    step.pop("ended_at", None)
    step.pop("error", None)
    if "steps_total" in data:
        view["steps_total"] = data["steps_total"]
    view["step"] = data["step"]
    view["progress"] = _overall(view, 0.0)


def _step_progress(view: View, data: dict[str, Any], at: str) -> None:
    step = _step(view, data["step"])
    step["progress"] = data["progress"]
    if data.get("message") is not None:
        step["message"] = data["message"]
    view["progress"] = _overall(view, data["progress"])


def _step_output(view: View, data: dict[str, Any], at: str) -> None:
    view["output_tail"] = (view["output_tail"] + list(data["lines"]))[-OUTPUT_TAIL_LINES:]


def _step_completed(view: View, data: dict[str, Any], at: str) -> None:
    step = _step(view, data["step"])
    step.update(status="completed", ended_at=at, progress=1.0)
    if data.get("result") is not None:
        step["result"] = data["result"]
    if data.get("message") is not None:
        step["message"] = data["message"]
    view["progress"] = _overall(view, 0.0)


def _step_failed(view: View, data: dict[str, Any], at: str) -> None:
    step = _step(view, data["step"])
    step.update(status="failed", ended_at=at, error=data["error"])


def _question(view: View, data: dict[str, Any], at: str) -> None:
    question = {k: data[k] for k in ("type", "prompt", "options") if k in data}
    view["questions"] = [*view["questions"], {"id": data["question"], **question}]


def _answered(view: View, data: dict[str, Any], at: str) -> None:
    view["questions"] = [q for q in view["questions"] if q["id"] != data["question"]]
    view["answers"] = {**view.get("answers", {}), data["question"]: data["answer"]}


def _cancel_requested(view: View, data: dict[str, Any], at: str) -> None:
    view["cancel_requested"] = True


def _retrying(view: View, data: dict[str, Any], at: str) -> None:
    view["attempt"] = data["attempt"]
    view["error"] = None
    view["cancel_requested"] = False
    view["deadline_from"] = at
    view.pop("ended_at", None)


def _completed(view: View, data: dict[str, Any], at: str) -> None:
    view["result"] = data.get("result")
    view["progress"] = 1.0
    view["ended_at"] = at


def _close_running_steps(view: View, status: str, at: str) -> None:
    """A run that ends leaves no step `running`: an interrupted step ends with the run."""
    if any(s["status"] == "running" for s in view["steps"]):
        view["steps"] = [{**s, "status": status, "ended_at": at} if s["status"] == "running" else s
                         for s in view["steps"]]


def _failed(view: View, data: dict[str, Any], at: str) -> None:
    view["error"] = data["error"]
    view["ended_at"] = at
    _close_running_steps(view, "failed", at)


def _ended(view: View, data: dict[str, Any], at: str) -> None:
    view["ended_at"] = at
    if data.get("reason") is not None:
        view["error"] = data["reason"]
    _close_running_steps(view, view["status"], at)


_FOLDS = {
    E.TASK_STARTED: _task_started,
    E.STEP_STARTED: _step_started,
    E.STEP_PROGRESS: _step_progress,
    E.STEP_OUTPUT: _step_output,
    E.STEP_COMPLETED: _step_completed,
    E.STEP_FAILED: _step_failed,
    E.TASK_QUESTION: _question,
    E.TASK_ANSWERED: _answered,
    E.TASK_CANCEL_REQUESTED: _cancel_requested,
    E.TASK_RETRYING: _retrying,
    E.TASK_COMPLETED: _completed,
    E.TASK_FAILED: _failed,
    E.TASK_CANCELLED: _ended,
    E.TASK_TIMED_OUT: _ended,
}


# The view as updates, lists and snapshots carry it (`get` returns the whole view).
COMPACT_STEPS = 20  # the last steps (and every running one)
COMPACT_TEXT_CHARS = 500  # a step's message, an error, a question's prompt or option
COMPACT_TAIL_CHARS = 4000  # the newest output lines that fit
COMPACT_QUESTIONS = 10
COMPACT_OPTIONS = 20
COMPACT_RESULT_BYTES = 4096
MAX_COMPACT_BYTES = 16 * 1024  # what an update's `task` may encode to, whatever the task did
_LEFT_OUT = frozenset({"input", "answers", "steps", "output_tail", "questions", "result", "error"})


def _cut(text: Any, chars: int = COMPACT_TEXT_CHARS) -> Any:
    return text[:chars] if isinstance(text, str) else text


def _compact_step(step: dict[str, Any]) -> dict[str, Any]:
    """`step` without its result and with its texts cut; `step` itself when that is all of
    it (most steps: a view's dicts are never written once made, see `apply`)."""
    out = step
    if "result" in step:
        out = step.copy()
        del out["result"]
    for k in ("message", "error"):
        text = out.get(k)
        if isinstance(text, str) and len(text) > COMPACT_TEXT_CHARS:
            if out is step:
                out = step.copy()
            out[k] = text[:COMPACT_TEXT_CHARS]
    return out


def compact(view: View) -> View:
    """A bounded copy of `view`: without `input`, `answers` and step results (they are in
    `task.created`, `task.answered` and `step.completed`, and in `get`), with the last
    COMPACT_STEPS steps plus every running one (`steps_count` says how many there are),
    the newest output lines up to COMPACT_TAIL_CHARS, texts cut to COMPACT_TEXT_CHARS, and
    `result` only when it is small (else null, with `result_truncated`). Invariant 6: an
    update frame does not grow with the input or with the number of events.

    The copy shares what it does not cut with `view` (steps, lines): read it, never write
    it. The relay compacts every view it publishes, so the common case (few steps, short
    texts) takes no copy it does not need."""
    out = view.copy()  # then without what is left out: cheaper than a filtering comprehension
    for key in _LEFT_OUT:
        out.pop(key, None)
    steps = view.get("steps") or []
    first = max(0, len(steps) - COMPACT_STEPS)
    out["steps"] = [_compact_step(s) for i, s in enumerate(steps)
                    if i >= first or s.get("status") == "running"]
    out["steps_count"] = len(steps)
    lines = view.get("output_tail") or []
    if sum(map(len, lines)) < COMPACT_TAIL_CHARS:  # at the budget, empty lines first are dropped
        out["output_tail"] = list(lines)
    else:
        tail: list[str] = []
        budget = COMPACT_TAIL_CHARS
        for line in reversed(lines):
            line = _cut(line, budget)
            budget -= len(line)
            tail.append(line)
            if budget <= 0:
                break
        out["output_tail"] = tail[::-1]
    questions = view.get("questions")
    out["questions"] = [
        {**{k: _cut(v) for k, v in q.items() if k != "options"},
         **({"options": [_cut(o, 100) for o in q["options"][:COMPACT_OPTIONS]]} if q.get("options") else {})}
        for q in questions[:COMPACT_QUESTIONS]] if questions else []
    out["error"] = _cut(view.get("error"))
    result = view.get("result")
    if result is not None and len(orjson.dumps(result)) > COMPACT_RESULT_BYTES:
        out["result"], out["result_truncated"] = None, True
    else:
        out["result"] = result
    return out


def minimal(view: View) -> View:
    """The smallest view an update can carry: for a compact view still over
    MAX_COMPACT_BYTES (labels, names and ids are bounded at the edge; this is the last
    resort), and for an event that could not be folded (`degraded`)."""
    keep = ("id", "kind", "scope", "status", "step", "progress", "attempt", "version", "position",
            "created_at", "updated_at", "ended_at", "cancel_requested")
    out = {k: _cut(view[k], 200) for k in keep if k in view}
    out["truncated"] = True
    return out


def ended_steps(before: View, after: View) -> list[dict[str, Any]]:
    """The steps that ended (completed or failed) between two views of a task, such as a
    run's claim and its end: each start raises a step's `attempt`, so a step ended in
    between is one whose (attempt, status) changed and is now an end."""
    was = {s["name"]: (s["attempt"], s["status"]) for s in before["steps"]}
    return [s for s in after["steps"]
            if s["status"] in ("completed", "failed") and was.get(s["name"]) != (s["attempt"], s["status"])]
