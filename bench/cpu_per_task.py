"""CPU per one-step task in two of taskcast's Python paths, without PostgreSQL or Redis, to
tell small changes apart where alternated drains cannot (their spread is ~15 %).

(a) relay: a read of 100 one-step `demo` tasks (600 rows, as `taskcast_read_after` returns
them: the creates of one commit, the starts of another, each task's four last events in one
commit each) turned into events (`event_from_row`), folded and encoded by the Projector
(every view in its cache, as in a drain), and framed as one Redis message (`encode_parts`).
(b) worker: `run_claim` of a claimed one-step `demo` task, 500 at a time, with a log whose
commits return at once (the fold and the runtime only), under this process's collector
settings as a worker sets them (cli/main.py).

Each figure is the best of ROUNDS timings (a shared machine only ever adds time), in µs a
task. No peer: these are taskcast's own paths; `drain.py` has the peer.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import uvloop

from cli.main import WORKER_YOUNG_OBJECTS
from events.clock import SystemClock, iso
from events.commit import prepare, view_after
from events.fold import View, apply, created_view
from events.ids import FenceToken, Position, TaskId, encode, new_task_id
from events.kinds.demo import DEMO
from events.log import event_from_row
from events.model import EventType, NewEvent
from events.queue import Claim
from events.relay.batch import encode_parts
from events.relay.projector import Projector
from events.runtime import run_claim

E = EventType
TASKS = 100
ROUNDS = 200
RUNS = 20_000
RUN_BATCH = 500


def rows(tasks: int) -> list[dict[str, Any]]:
    """What a read returns for `tasks` one-step demo tasks, in position order."""
    now = datetime.now(UTC)
    ids = [new_task_id() for _ in range(tasks)]
    out: list[dict[str, Any]] = []
    xid = 1000

    def row(task: str, version: int, type_: str, data: dict[str, Any], at: datetime) -> None:
        out.append({"xid": xid, "seq": len(out) + 1, "task_id": task, "version": version, "scope": "s",
                    "type": type_, "data": data, "at": at})

    created = {"kind": "demo", "scope": "s", "input": {"steps": 1, "step_ms": 0}, "labels": [],
               "depends_on": [], "timeout_s": None, "priority": 0}
    for task in ids:
        row(task, 1, "task.created", created, now)
    xid += 1
    for task in ids:
        row(task, 2, "task.started", {"worker": "w", "attempt": 1}, now + timedelta(milliseconds=3))
    for n, task in enumerate(ids):
        xid += 1
        at = now + timedelta(milliseconds=5, microseconds=n)
        row(task, 3, "step.started", {"step": "step_1", "worker": "w", "steps_total": 1}, at)
        row(task, 4, "step.progress", {"step": "step_1", "progress": 0.5, "message": "step 1 half done"}, at)
        row(task, 5, "step.completed", {"step": "step_1", "result": 1}, at)
        row(task, 6, "task.completed", {"result": {"steps": 1}}, at)
    return out


class _Cached:
    """The Projector's log, never asked: every view is in the cache after the first round."""

    async def views_before(self, wanted: dict[TaskId, int]) -> dict[TaskId, View | None]:
        return dict.fromkeys(wanted)

    async def view_before(self, task: TaskId, version: int) -> View | None:
        return None


async def relay_us(tasks: int, rounds: int) -> float:
    read = rows(tasks)
    best = float("inf")
    for _ in range(rounds):
        projector = Projector(_Cached())  # type: ignore[arg-type]
        started = time.perf_counter()
        events = [event_from_row(r) for r in read]  # type: ignore[arg-type]
        updates = await projector.updates(events)
        encode_parts(Position(0), updates, events[-1].position, 1, 0.0)
        best = min(best, time.perf_counter() - started)
    return best / tasks * 1e6


class _InstantLog:
    """A log whose commits return at once: the fold runs, nothing is written."""

    clock = SystemClock()

    async def advance(self, task: TaskId, view: View, events: list[NewEvent], **kwargs: Any) -> View:
        item = prepare(task, view, events, self.clock.now(), fence=kwargs.get("fence"),
                       job_state=kwargs.get("job_state"), run_at=kwargs.get("run_at"))
        await asyncio.sleep(0)
        return view_after(item, [(item.expected + i + 1, Position(1000 + i)) for i in range(len(events))])


def _claim() -> Claim:
    task, now = new_task_id(), iso(datetime.now(UTC))
    view = created_view(task, {"kind": "demo", "scope": "s", "input": {"steps": 1, "step_ms": 0}}, now)
    view = apply(view, task, 2, E.TASK_STARTED, {"worker": "w", "attempt": 1}, now)
    view["position"] = encode(Position(1))
    return Claim(task, FenceToken(1), 1, False, view)


async def worker_us(runs: int, batch: int) -> float:
    log: Any = _InstantLog()
    best = float("inf")
    for _ in range(max(1, runs // batch)):
        claims = [_claim() for _ in range(batch)]
        started = time.process_time()
        await asyncio.gather(*(run_claim(log, c, DEMO, worker="w", lease_s=30) for c in claims))
        best = min(best, time.process_time() - started)
    return best / batch * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args()
    gc.freeze()
    gc.set_threshold(WORKER_YOUNG_OBJECTS, 20, 20)  # as a worker sets it
    relay = uvloop.run(relay_us(TASKS, args.rounds))
    worker = uvloop.run(worker_us(RUNS, RUN_BATCH))
    print(f"CPU per one-step task, best of {args.rounds} rounds (relay) and of {RUNS // RUN_BATCH} "
          f"batches of {RUN_BATCH} (worker); no PostgreSQL, no Redis")
    print(f"  relay, rows -> events -> fold -> encoded updates -> one message: {relay:.1f} µs")
    print(f"  worker, run_claim with commits that return at once: {worker:.1f} µs")


if __name__ == "__main__":
    main()
