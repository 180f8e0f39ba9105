"""What each command appends, decided from the task's current view. Pure.

Each function returns a Decision or raises Conflict (finished task, question not pending,
nothing to retry); `EventLog.command` re-runs it when the task moved meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from events.errors import Conflict
from events.fold import View
from events.model import EventType, JobChange, NewEvent, Status

E = EventType

# A task nobody is running can be cancelled at once; a running one is asked to stop.
_IDLE = frozenset({Status.WAITING, Status.QUEUED, Status.RETRYING, Status.WAITING_ANSWER})
_RETRYABLE = frozenset({Status.FAILED, Status.CANCELLED, Status.TIMED_OUT})


@dataclass(frozen=True, slots=True)
class Decision:
    events: list[NewEvent]
    job_state: JobChange | None = None  # see taskcast_append_batch's p_job_states


def cancel(view: View, reason: str | None) -> Decision:
    status = Status(view["status"])
    why = reason or "cancelled"
    if status in _IDLE:
        return Decision([NewEvent(E.TASK_CANCELLED, {"reason": why})], job_state=JobChange.DONE)
    if status is Status.RUNNING:
        return Decision([NewEvent(E.TASK_CANCEL_REQUESTED, {"reason": why})], job_state=JobChange.CANCEL)
    raise Conflict(f"task {view['id']} is {status}; there is nothing to cancel")


def answer(view: View, question: str, value: Any) -> Decision:
    if Status(view["status"]) is not Status.WAITING_ANSWER or not any(
            q["id"] == question for q in view["questions"]):
        raise Conflict(f"question {question!r} of task {view['id']} is not pending")
    return Decision([NewEvent(E.TASK_ANSWERED, {"question": question, "answer": value})],
                    job_state=JobChange.QUEUED)


def retry(view: View) -> Decision:
    status = Status(view["status"])
    if status not in _RETRYABLE:
        raise Conflict(f"task {view['id']} is {status}; only failed, cancelled or timed-out "
                       "tasks can be retried")
    return Decision([NewEvent(E.TASK_RETRYING, {"attempt": view["attempt"] + 1, "delay_s": 0,
                                                "reason": "retry requested"})],
                    job_state=JobChange.QUEUED)


def time_out(view: View) -> Decision:
    """A task past its deadline whose worker is gone."""
    if Status(view["status"]).terminal:
        raise Conflict(f"task {view['id']} ended already")
    return Decision([NewEvent(E.TASK_TIMED_OUT, {"reason": "timeout (worker gone)"})],
                    job_state=JobChange.DONE)
