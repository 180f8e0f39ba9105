"""Prometheus metrics of the worker and relay processes (the node's: server/transport/metrics.py).

Each process has registries of its own, never prometheus_client's global one: several
nodes, relays and workers run in one test process. What is counted as it happens is an
instrument (a Counter, a Histogram); what the code already holds, or what only PostgreSQL
knows (the queue), is read at scrape time into families of that scrape only (`Scrape`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from events import db
from events.errors import TaskcastError
from events.fold import View, ended_steps
from events.model import Event, Status
from events.sql import q

if TYPE_CHECKING:
    from events.relay.publisher import Relay

QUEUE_READ_S = 1.0  # a scrape answers without the queue's gauges rather than wait longer
DURATION_BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LAG_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


def registry() -> CollectorRegistry:
    """A process's own registry, with the standard process_* metrics (CPU, memory, fds)."""
    r = CollectorRegistry()
    ProcessCollector(registry=r)
    return r


class Scrape:
    """One scrape: a registry's instruments, then the families read for this scrape only."""

    def __init__(self, registry_: CollectorRegistry, families: Iterable[Metric]) -> None:
        self.registry = registry_
        self.families = families

    def collect(self) -> Iterable[Metric]:
        yield from self.registry.collect()
        yield from self.families

    def render(self) -> bytes:
        """Prometheus' text format."""
        return generate_latest(self)


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


class WorkerMetrics:
    """The workers of one process (one registry for all of them) and the queue they claim from."""

    def __init__(self, pool: db.Pool) -> None:
        self.pool = pool
        self.registry = r = registry()
        self.claimed = Counter("taskcast_worker_claimed_jobs", "Jobs claimed", registry=r)
        self.claim_rounds = Counter("taskcast_worker_claims", "Claim statements sent, those that got "
                                    "nothing included", registry=r)
        self.claim_batch = Histogram("taskcast_worker_claim_batch_jobs", "Jobs per claim that got any",
                                     buckets=BATCH_BUCKETS, registry=r)
        self.running = Gauge("taskcast_worker_running_tasks", "Tasks running now", registry=r)
        self.task_seconds = Histogram(
            "taskcast_worker_task_seconds", "How long a run of a task took, by kind and how it ended "
            "(a terminal status, `retrying`, `waiting_answer`, or `lost`: the lease was lost)",
            ["kind", "status"], buckets=DURATION_BUCKETS_S, registry=r)
        self.lease_losses = Counter("taskcast_worker_lease_losses", "Runs stopped because their lease "
                                    "was lost (another worker resumes the task)", ["kind"], registry=r)
        self.retries = Counter("taskcast_worker_retries", "Runs that ended in a retry", ["kind"],
                               registry=r)
        self.steps = Counter("taskcast_worker_steps", "Steps ended, by kind and status",
                             ["kind", "status"], registry=r)

    def claims(self, count: int) -> None:
        self.claim_rounds.inc()
        if count:
            self.claimed.inc(count)
            self.claim_batch.observe(count)

    def ran(self, kind: str, seconds: float, status: Status | None, before: View, after: View) -> str:
        """A run ended (not cancelled): `status` is the terminal status it wrote, if any;
        `before` and `after` the task's view as claimed and as the run left it. Returns how
        it ended (the `status` label)."""
        outcome = status.value if status is not None else after["status"]
        if outcome == Status.RUNNING.value:  # it wrote no end: its lease was lost
            outcome = "lost"
            self.lease_losses.labels(kind).inc()
        elif outcome == Status.RETRYING.value:
            self.retries.labels(kind).inc()
        self.task_seconds.labels(kind, outcome).observe(seconds)
        for step in ended_steps(before, after):
            self.steps.labels(kind, step["status"]).inc()
        return outcome

    async def render(self) -> bytes:
        """The text format, with the queue's gauges when PostgreSQL answers within QUEUE_READ_S."""
        return Scrape(self.registry, await self.queue_families()).render()

    async def queue_families(self) -> list[Metric]:
        try:
            async with asyncio.timeout(QUEUE_READ_S), db.acquire(self.pool) as conn:
                rows = await conn.fetch(q("queue_depth"))
        except (TaskcastError, TimeoutError):
            return []
        depth = GaugeMetricFamily("taskcast_queue_depth", "Jobs queued and due, by kind", labels=["kind"])
        age = GaugeMetricFamily("taskcast_queue_oldest_age_seconds",
                                "How long the oldest due job has waited, by kind", labels=["kind"])
        for row in rows:
            depth.add_metric([row["kind"]], row["queued"])
            age.add_metric([row["kind"]], row["oldest_s"])
        return [depth, age]


class RelayMetrics:
    """One relay's: what it published, how late, in what batches."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.registry = r = registry()
        self.batch_events = Histogram("taskcast_relay_batch_events", "Events per published batch",
                                      buckets=BATCH_BUCKETS, registry=r)
        self.lag = Histogram("taskcast_relay_publish_lag_seconds", "From a batch's first event "
                             "(its writer's clock) to its publication", buckets=LAG_BUCKETS_S, registry=r)
        self.publish_errors = Counter("taskcast_relay_publish_errors", "Publications Redis refused "
                                      "(nodes fill them from the log)", registry=r)

    def published(self, events: Sequence[Event], now: float) -> None:
        self.batch_events.observe(len(events))
        at = datetime.fromisoformat(events[0].at.replace("Z", "+00:00")).timestamp()
        self.lag.observe(max(0.0, now - at))

    async def render(self) -> bytes:
        """The text format."""
        relay = self.relay
        return Scrape(self.registry, [
            counter("taskcast_relay_published_events", "Events published", relay.published_events),
            counter("taskcast_relay_degraded_updates", "Events published in their degraded form "
                    "(they could not be folded or encoded)", relay.projector.degraded),
            gauge("taskcast_relay_leading", "1 while this relay leads", relay.leading.is_set()),
        ]).render()
