"""Group commit: the appends of every task in a process go to PostgreSQL together.

A `Batcher` coalesces calls: while a batch is in flight, new items queue, and the next
batch takes them all at once. `GroupCommit` is the batcher of `EventLog.append`: each batch
is one call of `taskcast_append_batch` (migrations/0007_linear_batches.sql), one transaction
and one commit, whatever the number of tasks in it. Each item keeps its own checks: a
stale fence, a version conflict or a used key fails that item only; an outage fails the
batch, and each caller handles it as it would its own append's (events/runtime.py).

No latency is added: an item that finds nothing in flight is sent at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

import asyncpg

from events import db
from events.clock import iso
from events.errors import DuplicateKey, NotFound, StaleFence, TaskcastError, VersionConflict
from events.fold import View, apply
from events.ids import FenceToken, Position, TaskId, encode, position
from events.model import JobChange, NewEvent
from events.sql import q

log = logging.getLogger("taskcast.commit")
Item = TypeVar("Item")
R = TypeVar("R")

MAX_BATCH_ITEMS = 512
MAX_IN_FLIGHT = 2  # batches sent before the first returns: the round trips overlap
# The weight per batch at which a queue is shared between the batches in flight
# (bench/README.md, "Batches shared"). Appends weigh their events plus one: 16 one-event
# appends stay one batch, 16 of 100 events go as two of 8, and so does a worker's backlog.
# Creates weigh one each: 64 queued go as two of 32.
SPLIT_AT = 64
CREATES_SPLIT_AT = 32


class Batcher(Generic[Item, R]):
    """Runs `run(items)` on batches of submitted items, at most `in_flight` batches at a
    time; `run` answers each item with its result or its own exception. Items that have one
    of their `keys` in common never share a batch (the later one waits for the next). A
    failure of `run` itself is every item's.

    What is queued is shared among the batches that may be sent now, when it `weight`s at
    least `split_at` a batch: callers that were answered together submit again together,
    and one batch taking them all would leave the other idle, Python and PostgreSQL taking
    turns at one batch instead of working on two at once. Below it, a batch's fixed cost
    (a statement, a commit) outweighs what sharing gains."""

    def __init__(self, run: Callable[[list[Item]], Awaitable[Sequence[R | BaseException]]], *,
                 keys: Callable[[Item], tuple[Hashable, ...]], max_items: int = MAX_BATCH_ITEMS,
                 in_flight: int = MAX_IN_FLIGHT, weight: Callable[[Item], int] = lambda _: 1,
                 split_at: int | None = None, name: str = "batch") -> None:
        self._run = run
        self._keys = keys
        if split_at is not None and split_at < 1:
            raise ValueError(f"split_at must be at least 1, not {split_at}")  # else no batch takes any
        self._weight = weight
        self.split_at = split_at  # None: a batch takes all it can
        self.max_items = max_items
        self.in_flight = in_flight
        self.name = name
        self._queue: deque[tuple[Item, asyncio.Future[R]]] = deque()
        self._flushers: set[asyncio.Task[None]] = set()
        self._sending = 0  # batches in flight
        self.batches = 0  # sent, for /metrics and the tests
        self.items = 0

    async def submit(self, item: Item) -> R:
        """Queue `item` for the next batch; its result, or its exception."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._start_flusher()
        return await future

    def _start_flusher(self) -> None:
        if len(self._flushers) < self.in_flight:
            flusher = asyncio.create_task(self._flush(), name=self.name)
            self._flushers.add(flusher)
            flusher.add_done_callback(self._flushers.discard)  # one cancelled before it began

    def _cut(self) -> list[tuple[Item, asyncio.Future[R]]]:
        taken: list[tuple[Item, asyncio.Future[R]]] = []
        keys: set[Hashable] = set()
        later: list[tuple[Item, asyncio.Future[R]]] = []
        share = self._share()
        while self._queue and len(taken) < self.max_items and share > 0:
            item, future = self._queue.popleft()
            if future.done():  # its caller gave up before it was sent
                continue
            mine = self._keys(item)
            if not keys.isdisjoint(mine):
                later.append((item, future))
                continue
            keys.update(mine)
            taken.append((item, future))
            share -= self._weight(item)
        self._queue.extendleft(reversed(later))
        if self._queue:
            self._start_flusher()  # for the rest, at once
        return taken

    def _share(self) -> float:
        """The weight the next batch takes of the queue: all of it, or its share among the
        batches that may be sent now."""
        free = self.in_flight - self._sending
        if self.split_at is None or free < 2:
            return float("inf")
        total = sum(self._weight(item) for item, _ in self._queue)
        return total / free if total >= self.split_at * free else float("inf")

    async def _flush(self) -> None:
        me = asyncio.current_task()
        try:
            while batch := self._cut():
                await self._send(batch)
        finally:
            # At once, not in the task's done callback: an item queued in between would find
            # the set full and be left with no flusher to send it.
            self._flushers.discard(me)  # type: ignore[arg-type]

    async def _send(self, batch: list[tuple[Item, asyncio.Future[R]]]) -> None:
        self.batches += 1
        self.items += len(batch)
        self._sending += 1
        try:
            results = await self._run([item for item, _ in batch])
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(_copy(exc))
            if isinstance(exc, asyncio.CancelledError):
                self._fail_queued(exc)
                raise
            if not isinstance(exc, TaskcastError):
                log.error("%s failed", self.name, exc_info=exc)
            return
        finally:
            self._sending -= 1
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    def _fail_queued(self, exc: BaseException) -> None:
        if self._flushers - {asyncio.current_task()}:
            return  # another flusher goes on with them
        while self._queue:
            _, future = self._queue.popleft()
            if not future.done():
                future.set_exception(_copy(exc))


def _copy(exc: BaseException) -> BaseException:
    """A batch's failure for one of its callers: each gets its own exception object, so
    one caller's traceback does not grow on another's."""
    if isinstance(exc, TaskcastError):
        copy = type(exc)(*exc.args)
        copy.__cause__ = exc
        return copy
    if isinstance(exc, asyncio.CancelledError):
        return asyncio.CancelledError()
    return exc


@dataclass(frozen=True, slots=True)
class Append:
    """One task's append: its events after `view`, leaving the task at `new`."""

    task: TaskId
    expected: int  # the version `events` follow
    new: View
    events: Sequence[NewEvent]
    at: datetime
    fence: FenceToken | None = None
    job_state: JobChange | None = None
    run_at: datetime | None = None
    principal: str | None = None
    key: str | None = None


Stored = list[tuple[int, Position]]  # each event's version and position


def prepare(task: TaskId, view: View, events: Sequence[NewEvent], at: datetime, *,
            fence: FenceToken | None = None, job_state: JobChange | None = None,
            run_at: datetime | None = None, principal: str | None = None,
            key: str | None = None) -> Append:
    """The append of `events` to a task whose view is `view`, with the view after them, by
    the fold. Raises IllegalTransition (FSM)."""
    stamp = iso(at)
    new = view
    for i, event in enumerate(events, start=1):
        new = apply(new, task, view["version"] + i, event.type, event.data, stamp)
    return Append(task, view["version"], new, events, at, fence=fence, job_state=job_state,
                  run_at=run_at, principal=principal, key=key)


def view_after(item: Append, stored: Stored) -> View:
    """The task's view once `item` is committed: its new view, at its last event's position."""
    view = dict(item.new)
    view["position"] = encode(stored[-1][1])
    return view

_OUTCOMES: dict[str, Callable[[Append], TaskcastError]] = {
    "conflict": lambda a: VersionConflict(f"task {a.task} is not at version {a.expected}"),
    "not_found": lambda a: NotFound(f"no task {a.task}"),
    "stale": lambda a: StaleFence(f"fence {a.fence} of task {a.task} is stale"),
    "duplicate": lambda a: DuplicateKey(f"key {a.key!r} was used already"),
}


async def append_batch(conn: asyncpg.Connection, items: Sequence[Append]) -> list[Stored | TaskcastError]:
    """Append every item in one statement (in the caller's transaction, if any); each item's
    stored events, or its own error. Raises Unavailable."""
    ev_items: list[int] = []
    ev_versions: list[int] = []
    ev_types: list[str] = []
    ev_data: list[object] = []
    for n, item in enumerate(items, start=1):
        for k, event in enumerate(item.events, start=1):
            ev_items.append(n)
            ev_versions.append(item.expected + k)
            ev_types.append(event.type.value)
            ev_data.append(event.data)
    with db.translate():
        rows = await conn.fetch(
            q("append_batch"), [i.task for i in items], [i.expected for i in items],
            [i.new["status"] for i in items], [i.new for i in items],
            [i.expected + len(i.events) for i in items], [i.at for i in items],
            [i.fence for i in items], [None if i.job_state is None else i.job_state.value for i in items],
            [i.run_at for i in items], [i.principal for i in items], [i.key for i in items],
            ev_items, ev_versions, ev_types, ev_data)
    results: list[Stored | TaskcastError] = [[] for _ in items]
    index = {item.task: n for n, item in enumerate(items)}  # a task is in a batch at most once
    for row in rows:
        if row["outcome"] == "ok":
            stored = results[index[row["task"]]]
            assert isinstance(stored, list)
            stored.append((row["version"], position(row["xid"], row["seq"])))
        else:
            n = row["item"] - 1
            results[n] = _OUTCOMES[row["outcome"]](items[n])
    for stored in results:
        if isinstance(stored, list):
            stored.sort(key=lambda written: written[0])  # by version
    return results


@dataclass(frozen=True, slots=True)
class Create:
    """One new task: its row, its `task.created` event (`data`) and its job."""

    task: TaskId
    kind: str
    scope: str
    view: View
    priority: int
    data: dict[str, object]
    at: datetime
    job_state: JobChange | None
    mutex: str | None
    principal: str
    key: str | None


@dataclass(frozen=True, slots=True)
class Created:
    """A create's ack: the task's, or with duplicate=True the first one under its key."""

    task: TaskId
    status: str
    position: Position
    duplicate: bool


async def create_batch(conn: asyncpg.Connection, items: Sequence[Create]) -> list[Created]:
    """Create every item in one statement. Raises Unavailable."""
    with db.translate():
        rows = await conn.fetch(
            q("create_batch"), [i.task for i in items], [i.kind for i in items],
            [i.scope for i in items], [i.view["status"] for i in items], [i.view for i in items],
            [i.priority for i in items], [i.data for i in items], [i.at for i in items],
            [None if i.job_state is None else i.job_state.value for i in items],
            [i.mutex for i in items], [i.principal for i in items], [i.key for i in items])
    acks: list[Created | None] = [None] * len(items)
    for row in rows:
        acks[row["item"] - 1] = Created(TaskId(row["task"]), row["status"],
                                        position(row["xid"], row["seq"]), row["duplicate"])
    missing = [items[n].task for n, ack in enumerate(acks) if ack is None]
    if missing:  # a key's first command vanished between the claim and the read: retry
        raise VersionConflict(f"no ack for {', '.join(missing)}; try again")
    return [ack for ack in acks if ack is not None]


def _keys(item: Append | Create) -> tuple[Hashable, ...]:
    """What two items of one batch may not share: the task (the SQL takes each task once),
    and an idempotency key (one statement cannot claim a key twice)."""
    return (item.task,) if item.key is None else (item.task, (item.principal, item.key))


class GroupCommit:
    """The batchers of `EventLog.append` and `EventLog.create` over a pool: one
    transaction per batch."""

    def __init__(self, pool: asyncpg.Pool, *, max_items: int = MAX_BATCH_ITEMS,
                 in_flight: int = MAX_IN_FLIGHT) -> None:
        self.pool = pool
        self.appends: Batcher[Append, Stored] = Batcher(
            self._append, keys=_keys, max_items=max_items, in_flight=in_flight,
            weight=lambda item: 1 + len(item.events), split_at=SPLIT_AT,
            name="group commit (appends)")
        # Two creates under one key never share a batch: the second answers the first's ack.
        self.creates: Batcher[Create, Created] = Batcher(
            self._create, keys=_keys, max_items=max_items, in_flight=in_flight,
            split_at=CREATES_SPLIT_AT, name="group commit (creates)")

    async def append(self, item: Append) -> Stored:
        """Commit `item` with whatever else is queued. Raises its own error (VersionConflict,
        StaleFence, NotFound, DuplicateKey) or the batch's (Unavailable)."""
        return await self.appends.submit(item)

    async def create(self, item: Create) -> Created:
        """Create `item`'s task with whatever else is queued. Raises Unavailable."""
        return await self.creates.submit(item)

    async def _append(self, items: list[Append]) -> list[Stored | TaskcastError]:
        async with db.acquire(self.pool) as conn:
            return await append_batch(conn, items)

    async def _create(self, items: list[Create]) -> list[Created]:
        async with db.acquire(self.pool) as conn:
            return await create_batch(conn, items)
