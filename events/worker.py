"""The worker: claims jobs and runs them, up to `concurrency` at a time.

Three named loops, watched by one TaskGroup (a loop that dies stops the worker):
- `listen`: LISTEN taskcast_jobs; a notification only wakes the claimer (a hint, coalesced);
- `claim`: claims when woken, and polls every `poll_s` anyway (the table is the truth);
- `rescue`: re-queues jobs whose lease expired, so nothing stays `running` forever.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from events import db
from events.errors import Unavailable
from events.kinds import Kind
from events.log import EventLog
from events.queue import Queue
from events.runtime import run_claim

log = logging.getLogger("taskcast.worker")


@dataclass(frozen=True)
class WorkerConfig:
    concurrency: int = 8
    lease_s: float = 30.0
    poll_s: float = 1.0
    rescue_every_s: float = 5.0


class Worker:
    def __init__(self, database_url: str, log_: EventLog, kinds: Mapping[str, Kind],
                 config: WorkerConfig, *, name: str | None = None) -> None:
        self.database_url = database_url
        self.log = log_
        self.queue = Queue(log_.pool)
        self.kinds = dict(kinds)
        self.config = config
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._wake = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()
        self._slot_free = asyncio.Event()

    async def run(self) -> None:
        """Run until cancelled; on cancel, running tasks are cancelled and awaited (their
        leases expire and another worker resumes them at their first unfinished step)."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._listen(), name="worker.listen")
                tg.create_task(self._claim_loop(), name="worker.claim")
                tg.create_task(self._rescue_loop(), name="worker.rescue")
        finally:
            for task in list(self._running):
                task.cancel()
            await asyncio.gather(*self._running, return_exceptions=True)

    async def _listen(self) -> None:
        while True:
            try:
                conn = await db.connect(self.database_url)
            except Unavailable:
                await asyncio.sleep(self.config.poll_s)
                continue
            try:
                lost = asyncio.Event()
                conn.add_termination_listener(lambda *_, lost=lost: lost.set())
                await conn.add_listener("taskcast_jobs", lambda *_: self._wake.set())
                while not conn.is_closed():
                    try:
                        await asyncio.wait_for(lost.wait(), self.config.poll_s)
                    except TimeoutError:
                        pass
            finally:
                conn.terminate()

    async def _claim_loop(self) -> None:
        while True:
            if len(self._running) >= self.config.concurrency:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            self._wake.clear()
            try:
                claims = await self.queue.claim(
                    self.name, list(self.kinds), limit=self.config.concurrency - len(self._running),
                    lease_s=self.config.lease_s)
            except Unavailable as exc:
                log.warning("cannot claim: %s", exc)
                claims = []
            for claim in claims:
                kind = self.kinds[claim.view["kind"]]
                task = asyncio.create_task(
                    run_claim(self.log, self.queue, claim, kind, worker=self.name,
                              lease_s=self.config.lease_s), name=f"run {claim.task}")
                self._running.add(task)
                task.add_done_callback(self._finished)
            if claims:
                continue  # there may be more
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.poll_s)
            except TimeoutError:
                pass

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._slot_free.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("task runner crashed", exc_info=task.exception())

    async def _rescue_loop(self) -> None:
        while True:
            try:
                rescued = await self.queue.rescue()
                if rescued:
                    log.info("re-queued %d task(s) whose lease expired", len(rescued))
                    self._wake.set()
            except Unavailable as exc:
                log.warning("cannot rescue: %s", exc)
            await asyncio.sleep(self.config.rescue_every_s)
