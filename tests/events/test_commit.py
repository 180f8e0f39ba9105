"""Group commit: many tasks' appends in one transaction, each item with its own checks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from datetime import UTC, datetime

import asyncpg
import pytest

from events import db, decide
from events.clock import iso
from events.commit import Append, Batcher, Create, append_batch, create_batch
from events.errors import DuplicateKey, NotFound, StaleFence, Unavailable, VersionConflict
from events.fold import View, apply, created_view
from events.ids import TaskId, encode, new_task_id
from events.kinds import builtin
from events.log import CreateTask, EventLog
from events.model import EventType, JobChange, NewEvent
from events.queue import Queue
from events.runtime import RunContext, run_claim
from events.sql import q
from tests.plans import explaining, most_discarded, whole_scans
from tests.waiting import eventually_async

E = EventType


def _create(task: TaskId, key: str | None = None) -> Create:
    """A create of a queued `demo` task in scope `p`, as principal `p`."""
    now = datetime.now(UTC)
    data = CreateTask("demo", "p").data()
    return Create(task, "demo", "p", created_view(task, data, iso(now)), 0, data, now, JobChange.QUEUED,
                  None, "p", key)


def _append(view: View, event: NewEvent, **fields: object) -> Append:
    now = datetime.now(UTC)
    new = apply(view, TaskId(view["id"]), view["version"] + 1, event.type, event.data, "t")
    return Append(TaskId(view["id"]), view["version"], new, [event], now, **fields)  # type: ignore[arg-type]


async def test_one_stale_fence_in_a_batch_refuses_that_item_and_commits_the_others(
        event_log: EventLog, database_url: str) -> None:
    """Invariant 3 per item: in one batch, the item whose lease was taken over writes nothing;
    the items next to it (other tasks, their fences current) all commit."""
    for _ in range(3):
        await event_log.create(CreateTask("demo", "p"))
    claims = await Queue(event_log.pool).claim("w", ["demo"], limit=3, lease_s=30)
    stale = claims[1]
    conn = await asyncpg.connect(database_url)
    try:  # another worker took `stale` over: its fence went up
        await conn.execute("UPDATE jobs SET fence = fence + 1 WHERE task_id = $1", stale.task)
    finally:
        await conn.close()
    step = NewEvent(E.STEP_STARTED, {"step": "one"})
    async with db.acquire(event_log.pool) as conn:
        results = await append_batch(conn, [_append(c.view, step, fence=c.fence) for c in claims])
    assert isinstance(results[1], StaleFence)
    assert isinstance(results[0], list) and isinstance(results[2], list)
    for claim in claims:
        types = [e.type for e in await event_log.history(claim.task)]
        expected = [E.TASK_CREATED, E.TASK_STARTED] + ([] if claim is stale else [E.STEP_STARTED])
        assert types == expected


async def test_a_conflict_a_missing_task_and_a_used_key_each_fail_only_their_item(
        event_log: EventLog) -> None:
    """Every per-item check is the item's own: a stale version, a task that does not exist and a
    key used before each answer their own error, and the healthy item beside them commits."""
    a, b, c, d = [(await event_log.create(CreateTask("demo", "p"))).task for _ in range(4)]
    await event_log.command(c, lambda v: decide.cancel(v, "first"), principal="p", key="k1")
    cancel = NewEvent(E.TASK_CANCELLED, {"reason": "x"})
    view_a, view_b, view_d = [await event_log.view(t) for t in (a, b, d)]
    async with db.acquire(event_log.pool) as conn:
        results = await append_batch(conn, [
            _append(view_a, cancel),
            _append(dict(view_b, version=view_b["version"] - 1), cancel),  # someone wrote since
            _append(dict(view_a, id="tsk_missing"), cancel),
            _append(view_d, cancel, principal="p", key="k1"),  # the key c's cancel used
        ])
    assert isinstance(results[0], list)
    assert [type(r) for r in results[1:]] == [VersionConflict, NotFound, DuplicateKey]
    assert [(await event_log.view(t))["status"] for t in (a, b, c, d)] == [
        "cancelled", "queued", "cancelled", "queued"]


async def test_no_batch_function_compares_the_items_of_its_batch_pair_by_pair(database_url: str) -> None:
    """A batch costs in proportion to its size: 200 creates under keys in one batch, one claim
    that starts them all and one batch of appends to them: no plan node of the statements they
    run compares the batch's rows with each other (a nested loop over two sets of them, which
    grows with the square of the batch), and everything is written."""
    conn = await db.connect(database_url)
    try:
        plans = await explaining(conn)
        creates = [_create(new_task_id(), f"key {i}") for i in range(200)]
        created = await create_batch(conn, creates)
        assert [(c.task, c.duplicate) for c in created] == [(c.task, False) for c in creates]
        claimed = await conn.fetch("SELECT * FROM taskcast_claim_start('w', '{demo}', 200, 30, NULL)")
        assert len(claimed) == 200 and all(r["seq"] is not None for r in claimed)
        step = NewEvent(E.STEP_STARTED, {"step": "one"})
        appended = await append_batch(conn, [_append(r["view"], step, fence=r["fence"]) for r in claimed])
        assert all(isinstance(stored, list) and len(stored) == 1 for stored in appended)
        assert await conn.fetchval("SELECT count(*) FROM events") == 600
        # (fewer than a batch's items: pairing two of its sets would throw away ~20,000 pairs;
        # asyncpg's own introspection of the types joins a few rows)
        assert most_discarded(plans, node="Nested Loop") < len(creates)
    finally:
        await conn.close()


async def test_statements_planned_on_a_new_database_still_use_their_indexes_once_it_grew(
        database_url: str) -> None:
    """A process that started on a new database keeps reaching `tasks` and `jobs` by index
    as they grow: its create, claim, append and dependants' lookup, planned (and their plans
    cached) while the tables held one task, read neither table whole (by a sequential scan or
    a whole index) after 400 more tasks."""
    async def one_task(conn: asyncpg.Connection) -> None:
        task = new_task_id()
        await create_batch(conn, [_create(task)])
        (claimed,) = await conn.fetch("SELECT * FROM taskcast_claim_start('w', '{demo}', 1, 30, NULL)")
        done = _append(claimed["view"], NewEvent(E.TASK_COMPLETED, {"result": None}),
                       fence=claimed["fence"], job_state=JobChange.DONE)
        assert [len(stored) for stored in await append_batch(conn, [done])] == [1]  # type: ignore[arg-type]
        for _ in range(6):  # past asyncpg's and PostgreSQL's first custom plans: the generic one
            await conn.fetch(q("waiting_on"), [task])

    conn, other = await db.connect(database_url), await db.connect(database_url)
    try:
        await one_task(conn)
        await create_batch(other, [_create(new_task_id()) for _ in range(400)])
        plans = await explaining(conn)
        await one_task(conn)
        assert whole_scans(plans, ("tasks", "jobs")) == []
    finally:
        await asyncio.gather(conn.close(), other.close())


async def test_an_item_without_events_writes_nothing_and_fails_nothing(event_log: EventLog) -> None:
    """An item with no events (under a key) beside one with an event: the batch commits the
    other item and leaves the empty one's task as it was."""
    empty, full = [(await event_log.create(CreateTask("demo", "p"))).task for _ in range(2)]
    views = [await event_log.view(t) for t in (empty, full)]
    now = datetime.now(UTC)
    nothing = Append(empty, views[0]["version"], dict(views[0], status="cancelled"), [], now,
                     principal="p", key="empty")
    async with db.acquire(event_log.pool) as conn:
        cancel = _append(views[1], NewEvent(E.TASK_CANCELLED, {"reason": "x"}))
        results = await append_batch(conn, [nothing, cancel])
    assert results[0] == [] and isinstance(results[1], list) and len(results[1]) == 1
    assert (await event_log.view(empty))["status"] == "queued"
    assert (await event_log.view(full))["status"] == "cancelled"


async def test_concurrent_appends_share_transactions_and_each_lands_once(event_log: EventLog) -> None:
    """200 appends to 200 tasks at once go in a handful of transactions, each exactly once and
    with its own position, versions gapless per task."""
    tasks = [(await event_log.create(CreateTask("demo", "p"))).task for _ in range(200)]
    views = [await event_log.view(t) for t in tasks]
    before = event_log.committer.appends.batches
    cancel = NewEvent(E.TASK_CANCELLED, {"reason": "x"})
    results = await asyncio.gather(*(event_log.append(v["id"], v, [cancel]) for v in views))
    batches = event_log.committer.appends.batches - before
    assert batches < 50
    assert len({stored[0].position for _, stored in results}) == 200
    for task in tasks:
        assert [(e.version, e.type) for e in await event_log.history(task)] == [
            (1, E.TASK_CREATED), (2, E.TASK_CANCELLED)]


async def test_creates_made_at_once_are_shared_between_two_transactions(event_log: EventLog) -> None:
    """64 creates at once (a node with many clients) go out as two batches of 32 on two
    connections, not one of 64 while the other connection idles; each task is made once."""
    before = event_log.committer.creates.batches
    acks = await asyncio.gather(*(event_log.create(CreateTask("demo", "p")) for _ in range(64)))
    assert event_log.committer.creates.batches - before == 2
    assert len({a.task for a in acks}) == 64 and len({a.position for a in acks}) == 64
    views = await asyncio.gather(*(event_log.view(a.task) for a in acks))
    assert all(v["status"] == "queued" and v["version"] == 1 for v in views)


async def test_creates_under_one_key_at_once_make_one_task(event_log: EventLog) -> None:
    """A client retrying a create while the first is in flight gets the first's ack: one task."""
    spec = CreateTask("demo", "p")
    acks = await asyncio.gather(*(event_log.create(spec, principal="p", key="same") for _ in range(5)))
    assert len({a.task for a in acks}) == 1
    assert sum(not a.duplicate for a in acks) == 1


async def test_a_batch_that_fails_as_a_whole_fails_each_caller_with_its_own_error() -> None:
    """An outage during a batch is every item's error, each caller with an exception of its own,
    and the batcher goes on with the next batch."""
    calls: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            raise Unavailable("down")
        return [i * 2 for i in items]

    batcher: Batcher[int, int] = Batcher(run, keys=lambda i: (i,), in_flight=1)
    first = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(e, Unavailable) for e in first)
    assert len({id(e) for e in first}) == 3
    assert await asyncio.gather(*(batcher.submit(i) for i in range(3))) == [0, 2, 4]
    assert await asyncio.gather(batcher.submit(7), batcher.submit(7)) == [14, 14]  # same key: two batches


async def test_an_item_submitted_as_the_last_batch_ends_is_sent() -> None:
    """The caller woken by a batch's result submits at once, before the flusher that sent it
    is gone: its item still goes out (it once waited forever, and its task with it)."""
    async def run(items: list[int]) -> list[int]:
        await asyncio.sleep(0)
        return items

    batcher: Batcher[int, int] = Batcher(run, keys=lambda i: (i,), in_flight=1)
    for i in range(20):
        async with asyncio.timeout(5):
            assert await batcher.submit(i) == i


async def _batches_of(items: int, *, weight: int, split_at: int | None) -> list[list[int]]:
    """The batches a batcher of two in flight sends for `items` submitted together, each
    of `weight`, with every batch held until both could have been sent."""
    sent: list[list[int]] = []
    both = asyncio.Event()

    async def run(batch: list[int]) -> list[int]:
        sent.append(batch)
        if len(sent) == 2:
            both.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.2):  # a batch alone goes on after 0.2 s
                await both.wait()
        return batch

    batcher: Batcher[int, int] = Batcher(run, keys=lambda i: (i,), in_flight=2,
                                         weight=lambda _: weight, split_at=split_at)
    async with asyncio.timeout(5):
        assert await asyncio.gather(*(batcher.submit(i) for i in range(items))) == list(range(items))
    return sent


async def test_appends_submitted_together_are_shared_between_the_batches_in_flight() -> None:
    """16 heavy items submitted at once go out as two batches of 8 in flight together, each
    item once and in order, not one batch of 16 while the other connection idles."""
    sent = await _batches_of(16, weight=101, split_at=64)
    assert sent == [list(range(8)), list(range(8, 16))]


async def test_light_items_submitted_together_stay_one_batch() -> None:
    """16 one-event appends (weight 2 each, 32 in all) stay one batch: below the weight at
    which sharing pays for a second statement and commit. So does a batcher without one."""
    assert await _batches_of(16, weight=2, split_at=64) == [list(range(16))]
    assert await _batches_of(16, weight=101, split_at=None) == [list(range(16))]


def test_a_batcher_refuses_a_split_at_below_one() -> None:
    """A share threshold of 0 would let a batch take no item, and its callers wait forever."""
    with pytest.raises(ValueError, match="split_at"):
        Batcher(lambda items: asyncio.sleep(0, items), keys=lambda i: (i,), split_at=0)


WRITER = textwrap.dedent("""
    import asyncio, sys
    from events import db, decide
    from events.log import EventLog
    from events.model import EventType, JobChange, NewEvent

    async def main(url, tasks):
        pool = await db.create_pool(url, min_size=2, max_size=4)
        log = EventLog(pool)
        async def one(task):
            view = await log.view(task)
            n = 0
            while True:
                n += 1
                step = NewEvent(EventType.STEP_STARTED, {"step": f"s{n}"})
                view, stored = await log.append(task, view, [step])
                print(task, stored[0].version, f"s{n}", flush=True)
        await asyncio.gather(*(one(t) for t in tasks))

    asyncio.run(main(sys.argv[1], sys.argv[2:]))
""")


async def test_kill_9_during_group_commits_loses_nothing_acked_and_writes_nothing_twice(
        event_log: EventLog, database_url: str) -> None:
    """A process appending to 50 tasks through group commit is killed with SIGKILL mid-stream:
    every append it was told had committed is in the log, once, at the version it was told;
    nothing it was not told of is half there (versions gapless, each step once)."""
    tasks = [(await event_log.create(CreateTask("demo", "p"))).task for _ in range(50)]
    for task in tasks:  # running, so that step events are allowed
        view = await event_log.view(task)
        await event_log.append(task, view, [NewEvent(E.TASK_STARTED, {})])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, database_url, *tasks, stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.stdout is not None
    acked: list[tuple[str, int, str]] = []
    try:
        async with asyncio.timeout(30):
            while len(acked) < 2000:
                line = await proc.stdout.readline()
                assert line.endswith(b"\n"), "the writer stopped"
                task, version, step = line.decode().split()
                acked.append((task, int(version), step))
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    async with asyncio.timeout(5):  # what it printed before it died
        rest = (await proc.stdout.read()).decode()
    for line in rest.split("\n")[:-1]:  # the last is cut short by the kill (or empty)
        task, version, step = line.split()
        acked.append((task, int(version), step))

    async def settled() -> bool:  # the killed backend's transaction is gone
        conn = await asyncpg.connect(database_url)
        try:
            return not await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state = 'idle in transaction'")
        finally:
            await conn.close()

    await eventually_async(settled, within=10)
    stored = {task: await event_log.history(task) for task in tasks}
    for task, version, step in acked:
        event = stored[TaskId(task)][version - 1]
        assert (event.version, event.type, event.data["step"]) == (version, E.STEP_STARTED, step)
    for events in stored.values():
        assert [e.version for e in events] == list(range(1, len(events) + 1))
        steps = [e.data["step"] for e in events if e.type is E.STEP_STARTED]
        assert steps == [f"s{n}" for n in range(1, len(steps) + 1)]


async def test_the_claim_starts_what_it_claims_with_the_fold_of_task_started(event_log: EventLog) -> None:
    """A claimed task is already `running`, its `task.started` written by the claim's own
    statement; the view the claim folds in SQL is the one events/fold.py folds, for a
    queued task and for a retrying one, and it is the stored view at that event's position."""
    ack = await event_log.create(CreateTask("demo", "p"))
    queue = Queue(event_log.pool)
    for attempt in (1, 2):
        before = await event_log.view(ack.task)
        (claim,) = await queue.claim("w", ["demo"], limit=5, lease_s=30)
        started = (await event_log.history(ack.task))[-1]
        assert (started.type, started.data) == (E.TASK_STARTED, {"worker": "w", "attempt": attempt})
        folded = apply(before, ack.task, started.version, E.TASK_STARTED, started.data, started.at)
        folded["position"] = encode(started.position)
        assert claim.view == folded == await event_log.view(ack.task)
        assert claim.view["status"] == "running" and claim.attempt == attempt
        if attempt == 2:
            break
        retry = NewEvent(E.TASK_RETRYING, {"attempt": 2, "delay_s": 0, "reason": "again"})
        await event_log.append(ack.task, claim.view, [retry], fence=claim.fence,
                               job_state=JobChange.QUEUED, run_at=datetime.now(UTC))


CLAIM = "SELECT * FROM taskcast_claim_start('w', '{demo}', 4, 30, NULL)"
MINE = "SELECT count(*) FROM taskcast_writers() WHERE pid = pg_backend_pid()"


async def test_a_claim_that_finds_nothing_due_holds_no_reader_back(
        event_log: EventLog, database_url: str) -> None:
    """A claim on a queue with nothing due (most claims: every create wakes every lane)
    is no announced writer: while it is in flight, readers' bound is not held at it."""
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            assert await conn.fetch(CLAIM) == []
            assert await conn.fetchval(MINE) == 0
        await event_log.create(CreateTask("demo", "p"))  # now one is due: the claim announces
        async with conn.transaction():
            assert len(await conn.fetch(CLAIM)) == 1
            assert await conn.fetchval(MINE) == 1
    finally:
        await conn.close()


async def test_two_appends_under_one_key_at_once_never_fail_their_batch(event_log: EventLog) -> None:
    """Two commands sent at once under one key (a client retrying on another socket) never
    share a batch: one is applied, the other is refused as a used key, and the task beside
    them in the same moment is written as if neither existed."""
    a, b, bystander = [(await event_log.create(CreateTask("demo", "p"))).task for _ in range(3)]
    views = [await event_log.view(t) for t in (a, b, bystander)]
    cancel = NewEvent(E.TASK_CANCELLED, {"reason": "x"})
    results = await asyncio.gather(
        event_log.append(a, views[0], [cancel], principal="p", key="same"),
        event_log.append(b, views[1], [cancel], principal="p", key="same"),
        event_log.append(bystander, views[2], [cancel]), return_exceptions=True)
    assert sum(isinstance(r, DuplicateKey) for r in results[:2]) == 1
    assert not isinstance(results[2], BaseException)
    statuses = [(await event_log.view(t))["status"] for t in (a, b, bystander)]
    assert sorted(statuses[:2]) == ["cancelled", "queued"] and statuses[2] == "cancelled"


async def test_a_step_stops_at_once_when_its_deferred_start_finds_the_lease_gone(
        event_log: EventLog, database_url: str) -> None:
    """Invariant 3 with `step.started` not awaited: when its write finds the fence stale, the
    step is stopped at once (not at the next heartbeat) and nothing more is written."""
    ack = await event_log.create(CreateTask("demo", "p", {"steps": 1, "step_ms": 60_000}))
    queue = Queue(event_log.pool)
    (claim,) = await queue.claim("w", ["demo"], limit=1, lease_s=30)
    conn = await asyncpg.connect(database_url)
    try:  # another worker took it over
        await conn.execute("UPDATE jobs SET fence = fence + 1 WHERE task_id = $1", ack.task)
    finally:
        await conn.close()
    async with asyncio.timeout(5):  # the heartbeat would only look after 10 s
        status = await run_claim(event_log, claim, builtin()["demo"], worker="w", lease_s=30)
    assert status is None
    assert [e.type for e in await event_log.history(ack.task)] == [E.TASK_CREATED, E.TASK_STARTED]


async def test_output_due_while_a_flush_waits_is_written_by_that_flush(
        event_log: EventLog, database_url: str) -> None:
    """A flush falling due while another is still in flight (waiting for a lock, or for
    PostgreSQL) is not dropped: the one in flight goes round again and writes it."""
    await event_log.create(CreateTask("demo", "p"))
    (claim,) = await Queue(event_log.pool).claim("w", ["demo"], limit=1, lease_s=30)
    ctx = RunContext(event_log, claim, worker="w", flush_s=0.01)
    await ctx.write([NewEvent(E.STEP_STARTED, {"step": "s"})])
    ctx.step_name = "s"
    blocker = await asyncpg.connect(database_url)
    try:
        await blocker.execute("BEGIN")
        await blocker.execute("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE", claim.task)
        ctx.output(["one"])
        await eventually_async(lambda: _flushing(ctx), within=5)  # the first flush waits
        ctx.output(["two"])
        await eventually_async(lambda: _flag(ctx), within=5)  # due while it waits
        await blocker.execute("ROLLBACK")
    finally:
        await blocker.close()

    async def written() -> bool:
        lines = [line for e in await event_log.history(claim.task) if e.type is E.STEP_OUTPUT
                 for line in e.data["lines"]]
        return lines == ["one", "two"]

    await eventually_async(written, within=5)
    await ctx.close()


async def _flushing(ctx: RunContext) -> bool:
    return ctx._flushing is not None and not ctx._flushing.done()


async def _flag(ctx: RunContext) -> bool:
    return ctx._flush_again
