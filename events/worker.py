"""The worker: claims jobs and runs them, up to `concurrency` at a time.

Named loops, watched by one TaskGroup (a loop that dies stops the worker):
- `listen`: LISTEN taskcast_jobs and taskcast_cancel. A job notification only wakes the
  claimer (a coalesced hint); a cancel notification reaches the task's context at once.
- `claim`: claims when woken, and polls every `poll_s` anyway (the table is the truth);
  two lanes claim at once, each up to the free slots but a quarter of the concurrency
  at most, so claims overlap while there is a backlog (a claim came back full). Without
  one, a hint is answered by one lane: the other, whose hint is covered by a claim in
  flight that began after it, waits for the next, so an idle worker does not send every
  lane's claim for each new job.
  A slot is free when its run ends (its dependents are released after). The kinds with
  a `max_running` of their own (the built-in kinds that run processes) are claimed in the
  same statement after the others, only while they have room, and no more at once than
  the least of it (`Slots`).
- `maintain`: a round of the janitor (events/janitor.py) every `maintain_every_s`: leases
  expired, deadlines of tasks whose worker died, dependencies, retention.
- `heartbeat`: every third of the lease, one statement extends the leases of every task
  this worker runs and brings back their cancel flags; a task whose lease is gone, or not
  confirmed for a whole lease (PostgreSQL unreachable), stops at once and writes nothing.

`drain()` (at SIGTERM, before the process stops) stops claiming, gives the running tasks
a grace period to finish, then hands each remaining one back: its runner is stopped, its
job queued at once with its fence raised, so another worker resumes it at its first
unfinished step without waiting for the lease to expire.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from events import db, deps, tracing
from events.aio import pause, raise_if_cancelling, wait_event
from events.commit import Batcher
from events.errors import TaskcastError, Unavailable
from events.ids import TaskId
from events.janitor import Janitor
from events.kind import KindSpec
from events.log import EventLog
from events.metrics import WorkerMetrics
from events.queue import Claim, Queue
from events.runtime import RunContext, run_claim

log = logging.getLogger("taskcast.worker")

CLAIM_LANES = 2  # claims in flight at once


@dataclass(frozen=True)
class WorkerConfig:
    # Tasks running at once. They share the process's group commits and claims: the more
    # run, the fuller each batch and the cheaper each write (bench/drain.py, 1 worker on 2
    # cores, 20,000 one-step tasks: ~2,450 tasks/s at 256 before migration 0007; after it,
    # two runs of the bench in one session, medians of 2 each: 3,802/s at 256, 4,468/s at
    # 512; alternated single drains: 4,527-4,591/s at 512, 4,672-4,727/s at 1024). The
    # built-in kinds that run processes each run at most events.kinds.PROCESS_KINDS_RUNNING
    # at once whatever this is (KindSpec.max_running).
    concurrency: int = 512
    lease_s: float = 30.0
    poll_s: float = 1.0
    maintain_every_s: float = 2.0
    cancel_grace_s: float = 5.0
    scope_limit: int | None = None  # running tasks per scope, across all workers
    retention_s: float | None = 7 * 24 * 3600.0  # history of ended tasks kept this long
    prune_every_s: float = 60.0
    drain_grace_s: float = 10.0  # at SIGTERM, how long running tasks may take to finish
    stop_s: float = 5.0  # a drained runner's time to stop, and a hand-back's to commit
    workspace_root: str = ""  # scopes' directories for the built-in kinds (events.kinds.workspace)


class Slots:
    """A worker's slots: `concurrency` in all, and `caps` for the kinds limited on their
    own (KindSpec.max_running). A slot is held by a run until it ends, or reserved by a
    claim in flight, which may fill every slot it asked for.

    The kinds are claimed in two groups: those without a cap of their own, up to the free
    slots, and those with one, up to the least room among them (the claim cannot limit
    each kind apart), so a nearly full capped kind never shrinks the other kinds' claims."""

    def __init__(self, concurrency: int, caps: Mapping[str, int]) -> None:
        self.concurrency = concurrency
        self.caps = {kind: min(cap, concurrency) for kind, cap in caps.items()}
        self.held: Counter[str] = Counter()  # by kind, and "" for all
        self.reserved: Counter[str] = Counter()

    def groups(self, kinds: Iterable[str]) -> list[list[str]]:
        """The kinds without a cap of their own, and those with one (empty groups left out)."""
        kinds = list(kinds)
        split = [[k for k in kinds if k not in self.caps], [k for k in kinds if k in self.caps]]
        return [group for group in split if group]

    def plan(self, group: Sequence[str]) -> tuple[list[str], int]:
        """What to claim of `group` now: its kinds with room, and how many jobs. That is
        the free slots, but at most a quarter of them all at once (tasks started together
        would end together and leave the database idle while the next ones are claimed),
        and no more than any capped kind claimed has room for."""
        limit = min(self._room(""), -(-self.concurrency // 4))
        claimable = []
        for kind in group:
            if kind in self.caps:
                room = self._room(kind)
                if room <= 0:
                    continue
                limit = min(limit, room)
            claimable.append(kind)
        return (claimable, limit) if claimable and limit > 0 else ([], 0)

    def contended(self) -> bool:
        """Whether a claim in flight holds the only room some kind has (it may give it back)."""
        return self.reserved[""] > 0 and (
            self.concurrency - self.held[""] > 0 >= self._room("")
            or any(self.caps[k] - self.held[k] > 0 >= self._room(k) for k in self.caps))

    def _room(self, kind: str) -> int:
        cap = self.concurrency if kind == "" else self.caps[kind]
        return cap - self.held[kind] - self.reserved[kind]

    def reserve(self, kinds: Iterable[str], n: int) -> None:
        """Reserve `n` slots for a claim of `kinds` (a negative `n` gives them back)."""
        self.reserved[""] += n
        for kind in kinds:
            if kind in self.caps:
                self.reserved[kind] += n

    def take(self, kind: str | None) -> None:
        self.held[""] += 1
        if kind in self.caps:
            self.held[kind] += 1

    def free(self, kind: str | None) -> None:
        self.held[""] -= 1
        if kind in self.caps:
            self.held[kind] -= 1


class Worker:
    def __init__(self, database_url: str, log_: EventLog, kinds: Mapping[str, KindSpec],
                 config: WorkerConfig, *, name: str | None = None,
                 metrics: WorkerMetrics | None = None) -> None:
        self.database_url = database_url
        self.log = log_
        self.queue = Queue(log_.pool)
        self.kinds = dict(kinds)
        self.config = config
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._wake = asyncio.Event()  # a hint: there may be jobs to claim (see _hint)
        self._hints = 0
        self._in_flight: dict[asyncio.Future[None], int] = {}  # claims, and the hint each began after
        self._backlog = True  # the last claim to end came back full
        self._running: set[asyncio.Task[None]] = set()
        self._claims: dict[asyncio.Task[None], Claim] = {}
        self.draining = False
        self._contexts: dict[TaskId, RunContext] = {}
        self._slot_free = asyncio.Event()
        self.slots = Slots(config.concurrency, {k.name: k.max_running for k in kinds.values()
                                                if k.max_running is not None})
        self.listening = asyncio.Event()
        self.errors = 0  # failures a loop survived (logged with their item)
        self.metrics = metrics or WorkerMetrics(log_.pool)  # one for all the workers of a process
        self.janitor = Janitor(log_, self.kinds, config, worker=self.name)
        # The dependents of the tasks that ended, looked up for many at once.
        self._releases: Batcher[TaskId, None] = Batcher(self._release, keys=lambda t: (t,),
                                                        in_flight=1, name="release dependents")

    async def run(self) -> None:
        """Run until cancelled; on cancel, running tasks are cancelled and awaited (their
        leases expire and another worker resumes them at their first unfinished step)."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._listen(), name="worker.listen")
                tg.create_task(self._claim_loop(), name="worker.claim")
                tg.create_task(self._maintain_loop(), name="worker.maintain")
                tg.create_task(self._heartbeat_loop(), name="worker.heartbeat")
        finally:
            for task in list(self._running):
                task.cancel()
            await asyncio.gather(*self._running, return_exceptions=True)

    def _on_cancel(self, payload: str) -> None:
        ctx = self._contexts.get(TaskId(payload))
        if ctx is not None:
            ctx.cancelled.set()

    async def _listen(self) -> None:
        while True:
            try:
                conn = await db.connect(self.database_url)
            except Unavailable:
                await pause(self.config.poll_s)
                continue
            try:
                lost = asyncio.Event()
                conn.add_termination_listener(lambda *_, lost=lost: lost.set())
                await conn.add_listener("taskcast_jobs", lambda *_: self._hint())
                await conn.add_listener("taskcast_cancel", lambda *args: self._on_cancel(args[3]))
                self.listening.set()
                self._hint()  # anything enqueued while we were not listening
                while not conn.is_closed() and not await wait_event(lost, self.config.poll_s):
                    pass
            except (OSError, TaskcastError) as exc:
                log.warning("listener lost: %s", exc)
            except Exception:
                log.exception("listener failed; reconnecting")
                self.errors += 1
            finally:
                self.listening.clear()
                conn.terminate()
            await pause(self.config.poll_s)  # never a tight reconnect loop

    async def drain(self, grace_s: float | None = None) -> list[TaskId]:
        """Stop claiming; wait up to `grace_s` (default drain_grace_s) for the running
        tasks; then stop each one still running and hand its job back. Returns the tasks
        handed back. Time-boxed; idempotent."""
        self.draining = True
        self._hint()
        grace_s = self.config.drain_grace_s if grace_s is None else grace_s
        if self._running:
            await asyncio.wait(set(self._running), timeout=grace_s)
        left = {task: self._claims[task] for task in list(self._running) if task in self._claims}
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(set(left), timeout=self.config.stop_s)
        handed: list[TaskId] = []
        for claim in left.values():
            try:
                async with asyncio.timeout(self.config.stop_s):
                    if await self.queue.hand_back(claim.task, claim.fence):
                        handed.append(claim.task)
            except (TaskcastError, TimeoutError) as exc:  # its lease expires instead
                log.warning("cannot hand %s back: %s", claim.task, exc)
        if handed:
            log.info("handed back %d task(s): %s", len(handed), ", ".join(handed))
        return handed

    async def _claim_loop(self) -> None:
        """CLAIM_LANES lanes claim at once, so one lane's claim overlaps the other's round
        trip (SKIP LOCKED: they never take the same job, nor wait on each other)."""
        async with asyncio.TaskGroup() as tg:
            for lane in range(CLAIM_LANES):
                tg.create_task(self._claim_lane(), name=f"worker.claim.{lane}")

    async def _claim_lane(self) -> None:
        groups = self.slots.groups(self.kinds)
        while True:
            raise_if_cancelling()  # the waits below have no deadline
            if self.draining:
                await asyncio.Event().wait()  # claims nothing more; cancelled at stop
            # Clearing the hint before the claim is safe per lane: whatever was notified
            # before this point is committed, so this lane's claim sees it. Unless a kind
            # is left out only while the other lane's claim holds its room: its job may be
            # what the hint was for, so the hint stays for the next round.
            keep_hint = self.slots.contended()
            covering = self._covering()
            if covering:
                # A claim in flight began after the last hint, and the last one to end left
                # no backlog: it takes what the hint was for. This lane waits for the next
                # hint, unless that claim comes back full.
                await asyncio.wait(covering, timeout=self.config.poll_s)
                if not self._backlog:
                    await wait_event(self._wake, self.config.poll_s)
                continue
            plans: list[tuple[list[str], int]] = []
            for group in groups:  # each planned with the ones before it reserved
                kinds, limit = self.slots.plan(group)
                if limit:
                    self.slots.reserve(kinds, limit)
                    plans.append((kinds, limit))
            if not plans:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            if not keep_hint:
                self._wake.clear()
            if await self._claim(plans):
                continue  # there may be more
            await wait_event(self._wake, self.config.poll_s)

    def _hint(self) -> None:
        """Wake the claim lanes: a job may have been queued or freed."""
        self._hints += 1
        self._wake.set()

    def _covering(self) -> list[asyncio.Future[None]]:
        """The claims in flight that began after the last hint, unless the last claim to
        end came back full (then every lane claims: the round trips overlap)."""
        if self._backlog:
            return []
        return [done for done, hints in self._in_flight.items() if hints == self._hints]

    async def _claim(self, plans: list[tuple[list[str], int]]) -> int:
        """Claim what `plans` reserved (up to each limit of its kinds, in one statement)
        and start running it; how many."""
        (kinds, limit), *more = plans
        done = asyncio.get_running_loop().create_future()
        self._in_flight[done] = self._hints
        claims: list[Claim] = []
        try:
            claims = await self.queue.claim(
                self.name, kinds, limit=limit, lease_s=self.config.lease_s,
                scope_limit=self.config.scope_limit, more=more[0] if more else ((), 0))
        except Unavailable as exc:
            log.warning("cannot claim: %s", exc)
            claims = []
        except Exception:
            # Invariant 9: no one job or query stops the loop; back off and go on.
            log.exception("claim failed")
            self.errors += 1
            claims = []
        finally:
            del self._in_flight[done]
            done.set_result(None)
            full = len(claims) >= sum(n for _, n in plans)
            if full and not self._backlog:
                self._hint()  # the other lanes claim too, while this one claims again
            self._backlog = full
            for reserved, n in plans:
                self.slots.reserve(reserved, -n)
            self._slot_free.set()  # what the claim did not fill is free again
        self.metrics.claims(len(claims))
        if self.draining:  # claimed while the drain began: give them straight back
            for claim in claims:
                try:
                    async with asyncio.timeout(self.config.stop_s):
                        await self.queue.hand_back(claim.task, claim.fence)
                except (TaskcastError, TimeoutError) as exc:  # its lease expires instead
                    log.warning("cannot hand %s back: %s", claim.task, exc)
            return 0
        for claim in claims:
            self.slots.take(claim.view.get("kind"))
            task = asyncio.create_task(self._execute(claim), name=f"run {claim.task}")
            self._claims[task] = claim
            self._running.add(task)
            task.add_done_callback(self._finished)
            self.metrics.running.inc()
        return len(claims)

    async def _execute(self, claim: Claim) -> None:
        kind = self.kinds.get(claim.view["kind"])
        if kind is None:  # claims name only our kinds; a view that disagrees is corrupt
            log.error("claimed %s of unknown kind %r", claim.task, claim.view.get("kind"))
            return

        ran: list[RunContext] = []

        def track(ctx: RunContext | None) -> None:
            if ctx is None:
                self._contexts.pop(claim.task, None)
            else:
                self._contexts[claim.task] = ctx
                ran.append(ctx)

        async with tracing.running(self.log.pool, claim.task, kind.name, claim.attempt) as traced:
            started = time.monotonic()
            status = await run_claim(self.log, claim, kind, worker=self.name,
                                     lease_s=self.config.lease_s, cancel_grace_s=self.config.cancel_grace_s,
                                     workspace_root=self.config.workspace_root, on_context=track)
            outcome = self.metrics.ran(kind.name, time.monotonic() - started, status, claim.view,
                                       ran[0].view)
            traced.ended(outcome, claim.view, ran[0].view)
        self._free_slot(asyncio.current_task())  # the run is over: the next claim may have its slot
        if status is not None and status.terminal:
            try:
                await self._releases.submit(claim.task)
            except TaskcastError as exc:  # the maintain loop settles them later
                log.warning("cannot release the dependents of %s now: %s", claim.task, exc)

    async def _release(self, finished: list[TaskId]) -> list[None]:
        await deps.release(self.log, finished)
        return [None] * len(finished)

    def _free_slot(self, task: asyncio.Task[Any] | None) -> None:
        """Once per runner: its run is over (its dependents may still be being released)."""
        if task is not None and task in self._claims:
            claim = self._claims.pop(task)  # nothing left to hand back at a drain
            self.slots.free(claim.view.get("kind"))
            self.metrics.running.dec()
            self._slot_free.set()
            # A scope, mutex or cap slot may have opened. And a claim can come back short
            # with jobs still queued (a row another worker's claim committed between this
            # claim's snapshot and its lock drops out of its LIMIT): a lane that took that
            # for an empty queue would wait for a poll.
            self._hint()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._free_slot(task)
        if not task.cancelled() and task.exception() is not None:
            self.errors += 1
            log.error("task runner crashed", exc_info=task.exception())

    async def maintain(self) -> None:
        """One round of the janitor's work (events/janitor.py); wakes the claimer when it
        re-queued something."""
        if await self.janitor.round():
            self._hint()

    async def heartbeat(self) -> None:
        """Extend the lease of every task running here, in one statement; set the cancel
        flags it brings back; stop the tasks whose lease is gone, or has not been confirmed
        for a whole lease. Raises Unavailable (then the leases stand as they were)."""
        running = {task: ctx for task, ctx in self._contexts.items() if not ctx.lost.is_set()}
        if not running:
            return
        asked = time.monotonic()
        try:
            async with asyncio.timeout(self.config.lease_s / 3):
                flags = await self.queue.heartbeat({t: c.fence for t, c in running.items()},
                                                   self.config.lease_s)
        except (TaskcastError, TimeoutError) as exc:
            for ctx in running.values():
                if time.monotonic() - ctx.lease_ok_at > self.config.lease_s:
                    ctx.lose(f"heartbeats failed for longer than the lease: {exc}")
            raise Unavailable(f"heartbeat: {exc}") from exc
        for task, ctx in running.items():
            if task not in flags:
                ctx.lose(f"lease of {task} lost")
                continue
            ctx.lease_ok_at = asked
            if flags[task]:
                ctx.cancelled.set()

    async def _heartbeat_loop(self) -> None:
        while True:
            await pause(self.config.lease_s / 3)
            try:
                await self.heartbeat()
            except TaskcastError as exc:
                log.warning("heartbeat failed: %s", exc)
            except Exception:
                log.exception("heartbeat failed")
                self.errors += 1

    async def _maintain_loop(self) -> None:
        while True:
            try:
                await self.maintain()
            except TaskcastError as exc:
                log.warning("maintenance failed: %s", exc)
            except Exception:
                log.exception("maintenance failed")
                self.errors += 1
            await pause(self.config.maintain_every_s)
