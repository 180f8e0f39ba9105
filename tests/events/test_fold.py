"""The fold and the FSM: pure, and the one source of every task view."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from cli.process import Process
from events.errors import IllegalTransition
from events.fold import (
    COMPACT_OPTIONS,
    COMPACT_QUESTIONS,
    COMPACT_RESULT_BYTES,
    COMPACT_STEPS,
    COMPACT_TAIL_CHARS,
    COMPACT_TEXT_CHARS,
    apply,
    compact,
    rebuild,
)
from events.ids import TaskId
from events.log import EventLog
from events.model import TERMINAL, TRANSITIONS, EventType, Status, next_status
from tests.conftest import ws_url
from tests.wsclient import Client

E = EventType
T = TaskId("tsk_1")


def _created(**data: object) -> dict[str, object]:
    return apply(None, T, 1, E.TASK_CREATED, {"kind": "demo", "scope": "s", **data}, "t0")


def test_a_task_starts_queued_or_waiting_for_dependencies() -> None:
    """task.created makes a queued task, or a waiting one when it has dependencies."""
    assert _created()["status"] == "queued"
    assert _created(depends_on=["tsk_0"])["status"] == "waiting"


def test_steps_fold_into_the_view() -> None:
    """Step events build the step timeline, overall progress and the output tail."""
    view = _created()
    events = [(E.TASK_STARTED, {}), (E.STEP_STARTED, {"step": "a", "steps_total": 2}),
              (E.STEP_PROGRESS, {"step": "a", "progress": 0.5, "message": "half"}),
              (E.STEP_OUTPUT, {"step": "a", "lines": ["x", "y"]}),
              (E.STEP_COMPLETED, {"step": "a", "result": 1}),
              (E.STEP_STARTED, {"step": "b"})]
    for version, (type_, data) in enumerate(events, start=2):
        view = apply(view, T, version, type_, data, f"t{version}")
    assert view["status"] == "running" and view["step"] == "b" and view["version"] == 7
    assert [(s["name"], s["status"]) for s in view["steps"]] == [("a", "completed"), ("b", "running")]
    assert view["steps"][0]["result"] == 1 and view["steps"][0]["message"] == "half"
    assert view["progress"] == 0.5 and view["output_tail"] == ["x", "y"]


def test_apply_never_mutates_its_input() -> None:
    """Views are values: folding returns a new view and leaves the old one as it was."""
    view = apply(_created(), T, 2, E.TASK_STARTED, {}, "t")
    before = repr(view)
    apply(view, T, 3, E.STEP_STARTED, {"step": "a"}, "t")
    assert repr(view) == before


def _grown(steps: int, *, output: list[str], result: object, error: str | None,
           questions: int = 15, chars: int = 900) -> dict[str, Any]:
    view = apply(_created(input={"big": "i" * 10_000}), T, 2, E.TASK_STARTED, {}, "t")
    events: list[tuple[EventType, dict[str, Any]]] = [(E.STEP_STARTED, {"step": "kept running"})]
    for n in range(steps):
        events += [(E.STEP_STARTED, {"step": f"s{n}"}),
                   (E.STEP_PROGRESS, {"step": f"s{n}", "progress": 0.5, "message": "m" * (n * 40)}),
                   (E.STEP_COMPLETED, {"step": f"s{n}", "result": {"n": n}})]
    events.append((E.STEP_OUTPUT, {"step": "kept running", "lines": output}))
    for version, (type_, data) in enumerate(events, start=view["version"] + 1):
        view = apply(view, T, version, type_, data, "t")
    view = {**view, "result": result, "error": error, "answers": {"q_1": "yes"},
            "questions": [{"question": f"q_{n}", "type": "t", "prompt": "p" * chars,
                           "options": [f"o{k}" * (chars // 15) for k in range(questions * 2)]}
                          for n in range(questions)]}
    return view


def test_a_compact_view_is_bounded_and_leaves_the_view_as_it_was() -> None:
    """compact() keeps the last steps and every running one, without results, with texts,
    the output tail, questions and a large result cut to their bounds; the view is unchanged."""
    view = _grown(30, output=[f"line {n} " + "o" * 300 for n in range(40)], result="r" * 5000,
                  error="e" * 2000)
    before = copy.deepcopy(view)
    out = compact(view)
    assert view == before
    assert "input" not in out and "answers" not in out and out["steps_count"] == 31
    names = [s["name"] for s in out["steps"]]
    assert names == ["kept running", *[f"s{n}" for n in range(30 - COMPACT_STEPS, 30)]]
    assert all("result" not in s and len(s.get("message", "")) <= COMPACT_TEXT_CHARS for s in out["steps"])
    tail = out["output_tail"]
    assert tail[-1] == view["output_tail"][-1] and sum(map(len, tail)) <= COMPACT_TAIL_CHARS
    assert len(out["questions"]) == COMPACT_QUESTIONS
    assert all(len(q["prompt"]) == COMPACT_TEXT_CHARS and len(q["options"]) == COMPACT_OPTIONS
               for q in out["questions"])
    assert len(out["error"]) == COMPACT_TEXT_CHARS
    assert out["result"] is None and out["result_truncated"] is True


def test_a_small_view_compacts_to_itself_without_input_answers_and_step_results() -> None:
    """Nothing of a small view is cut: compact() only leaves out the input, the answers and
    the steps' results, and a small result stays."""
    view = _grown(2, output=["a", "b"], result={"ok": 1}, error="e", questions=2, chars=30)
    out = compact(view)
    expected = {k: v for k, v in view.items() if k not in ("input", "answers")}
    expected["steps"] = [{k: v for k, v in s.items() if k != "result"} for s in view["steps"]]
    expected["steps_count"] = 3
    assert out == expected and len(orjson.dumps(out["result"])) <= COMPACT_RESULT_BYTES


def test_an_output_tail_at_its_budget_keeps_only_the_lines_that_fill_it() -> None:
    """Lines before those that fill COMPACT_TAIL_CHARS are left out, empty ones too."""
    view = _grown(0, output=["", "x" * COMPACT_TAIL_CHARS], result=None, error=None)
    assert compact(view)["output_tail"] == ["x" * COMPACT_TAIL_CHARS]


def test_a_version_must_follow_the_view() -> None:
    """Versions are gapless: applying version 3 to a version-1 view is an error."""
    with pytest.raises(ValueError):
        apply(_created(), T, 3, E.TASK_STARTED, {}, "t")


@pytest.mark.parametrize("status", sorted(TERMINAL))
def test_a_terminal_task_takes_no_second_terminal_event(status: Status) -> None:
    """Invariant 7: exactly one terminal event per run."""
    for terminal in (E.TASK_COMPLETED, E.TASK_FAILED, E.TASK_CANCELLED, E.TASK_TIMED_OUT):
        with pytest.raises(IllegalTransition):
            next_status(status, terminal)


def test_only_unfinished_runs_can_be_retried() -> None:
    """`retry` starts a new run of a failed, cancelled or timed-out task, never a completed one."""
    assert {s for (s, e) in TRANSITIONS if e is E.TASK_RETRYING} == {
        Status.RUNNING, Status.FAILED, Status.CANCELLED, Status.TIMED_OUT}


async def test_rebuilding_every_view_from_its_events_equals_the_projection(
        taskcast: Process, event_log: EventLog) -> None:
    """The stored projection is exactly the fold of each task's history."""
    client = await Client.open(ws_url(taskcast))
    tasks = []
    for steps in (1, 3, 5):
        ack = await client.request({"type": "create", "kind": "demo", "scope": "p",
                                    "input": {"steps": steps, "step_ms": 5}, "subscribe": True})
        tasks.append(ack["task"])
    done: set[str] = set()

    def finished(frame: dict[str, object]) -> bool:
        if frame["type"] == "update" and frame["event"]["type"] == "task.completed":  # type: ignore[index]
            done.add(frame["event"]["task"])  # type: ignore[index]
        return done == set(tasks)

    await client.until(finished, within=20)
    for task in tasks:
        stored = await event_log.view(TaskId(task))
        history = await event_log.history(TaskId(task))
        rebuilt = rebuild(TaskId(task), [(e.version, e.type, e.data, e.at) for e in history])
        assert rebuilt is not None
        assert {**rebuilt, "position": None} == {**stored, "position": None}
    await client.close()
