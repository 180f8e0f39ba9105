"""The worker and relay processes' metrics, scraped from real `taskcast worker` and
`taskcast relay` processes on their metrics ports."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Iterator

import pytest

from events.ids import TaskId
from events.log import CreateTask, EventLog
from server.settings import Settings
from tests.scraping import Families, scrape
from tests.spawn import process_env, taskcast
from tests.waiting import eventually_async, free_port

DEMO = {"steps": 2, "step_ms": 1}
WORKER_FAMILIES = {
    "taskcast_worker_claimed_jobs": "counter", "taskcast_worker_claim_batch_jobs": "histogram",
    "taskcast_worker_running_tasks": "gauge", "taskcast_worker_task_seconds": "histogram",
    "taskcast_worker_lease_losses": "counter", "taskcast_worker_retries": "counter",
    "taskcast_worker_steps": "counter", "taskcast_queue_depth": "gauge",
    "taskcast_queue_oldest_age_seconds": "gauge", "process_cpu_seconds": "counter",
}
RELAY_FAMILIES = {
    "taskcast_relay_published_events": "counter", "taskcast_relay_degraded_updates": "counter",
    "taskcast_relay_batch_events": "histogram", "taskcast_relay_publish_lag_seconds": "histogram",
    "taskcast_relay_publish_errors": "counter", "taskcast_relay_leading": "gauge",
}


@pytest.fixture
def run(settings: Settings) -> Iterator[Callable[..., int]]:
    """`run("worker", TASKCAST_WORKER_METRICS_PORT=...)` starts a `taskcast` process of this
    test and returns its metrics port; each is stopped (SIGTERM, then SIGKILL) at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(command: str, port_variable: str) -> int:
        port = free_port()
        procs.append(taskcast(settings, command, env=process_env(
            settings, TASKCAST_WORKSPACE_ROOT=settings.workspace_root, **{port_variable: str(port)})))
        return port

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def _scrape_until(port: int, condition: Callable[[Families], bool], within: float = 30) -> Families:
    """Scrape until `condition` holds (the process may still be starting); the last scrape."""
    last: list[Families] = []

    async def holds() -> bool:
        try:
            last[:] = [await scrape(port)]
        except OSError:  # not listening yet
            return False
        return condition(last[0])

    await eventually_async(holds, within=within, poll_s=0.1)
    return last[0]


async def test_a_worker_reports_claims_runs_by_kind_and_status_steps_and_retries(
        event_log: EventLog, run: Callable[..., int]) -> None:
    """After a worker ran three demo tasks (one failing a step once, then retried), its
    metrics port reports the claims, each run's duration by kind and how it ended, the
    retry, and the steps ended, each family of its type."""
    tasks = [(await event_log.create(CreateTask("demo", "p", input=i))).task
             for i in (DEMO, DEMO, {**DEMO, "fail_step": 1})]
    port = run("worker", "TASKCAST_WORKER_METRICS_PORT")

    def all_ran(f: Families) -> bool:
        return f.value("taskcast_worker_task_seconds", "taskcast_worker_task_seconds_count",
                       kind="demo", status="completed") == 3

    families = await _scrape_until(port, all_ran)
    assert [(await event_log.view(TaskId(t)))["status"] for t in tasks] == ["completed"] * 3
    assert {name: families.type(name) for name in WORKER_FAMILIES} == WORKER_FAMILIES
    claimed = families.value("taskcast_worker_claimed_jobs")
    assert claimed == 4  # the retried task twice
    assert families.value("taskcast_worker_claim_batch_jobs",
                          "taskcast_worker_claim_batch_jobs_sum") == claimed
    assert families.value("taskcast_worker_task_seconds", "taskcast_worker_task_seconds_count",
                          kind="demo", status="retrying") == 1
    assert families.value("taskcast_worker_retries", kind="demo") == 1
    assert families.value("taskcast_worker_steps", kind="demo", status="completed") == 6
    assert families.value("taskcast_worker_steps", kind="demo", status="failed") == 1
    assert families.value("taskcast_worker_lease_losses") == 0
    assert families.value("taskcast_worker_running_tasks") == 0


async def test_queue_depth_and_the_oldest_jobs_age_are_read_from_the_queue(
        event_log: EventLog, run: Callable[..., int]) -> None:
    """Jobs no worker can claim show in the queue's depth and age by kind, read at each
    scrape; those a worker ran are gone from it."""
    for _ in range(2):
        await event_log.create(CreateTask("nobody.runs.this", "p"))
    await event_log.create(CreateTask("demo", "p", input=DEMO))
    port = run("worker", "TASKCAST_WORKER_METRICS_PORT")

    def demo_ran(f: Families) -> bool:
        return f.value("taskcast_worker_task_seconds", "taskcast_worker_task_seconds_count") == 1

    families = await _scrape_until(port, demo_ran)
    assert families.value("taskcast_queue_depth", kind="nobody.runs.this") == 2
    assert families.samples("taskcast_queue_depth", kind="demo") == []
    [age] = families.samples("taskcast_queue_oldest_age_seconds", kind="nobody.runs.this")
    assert age.value >= 0
    await event_log.create(CreateTask("nobody.runs.this", "p"))
    families = await scrape(port)
    assert families.value("taskcast_queue_depth", kind="nobody.runs.this") == 3


async def test_a_relay_reports_what_it_published_in_which_batches_and_how_late(
        event_log: EventLog, run: Callable[..., int]) -> None:
    """A relay's metrics port says it leads, how many events it published, in batches
    whose sizes add up to them, each batch's lag observed."""
    port = run("relay", "TASKCAST_RELAY_METRICS_PORT")
    await _scrape_until(port, lambda f: f.value("taskcast_relay_leading") == 1)
    for _ in range(3):
        await event_log.create(CreateTask("demo", "p"))

    def published(f: Families) -> bool:
        return f.value("taskcast_relay_published_events") == 3

    families = await _scrape_until(port, published)
    assert {name: families.type(name) for name in RELAY_FAMILIES} == RELAY_FAMILIES
    batches = families.value("taskcast_relay_batch_events", "taskcast_relay_batch_events_count")
    assert 1 <= batches <= 3
    assert families.value("taskcast_relay_batch_events", "taskcast_relay_batch_events_sum") == 3
    assert families.value("taskcast_relay_publish_lag_seconds",
                          "taskcast_relay_publish_lag_seconds_count") == batches
    assert families.value("taskcast_relay_degraded_updates") == 0
