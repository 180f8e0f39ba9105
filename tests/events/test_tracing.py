"""Tracing a task with OpenTelemetry: one trace from `create` through its run and steps
to the publication of its end, its context carried through PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import asyncpg
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cli.process import Process
from events import tracing
from tests.conftest import ws_url
from tests.waiting import eventually
from tests.wsclient import Client


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for this test, into memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    try:
        yield exporter
    finally:
        tracing.use(None)
        provider.shutdown()


async def _run_demo(process: Process, input_: dict[str, int]) -> str:
    client = await Client.open(ws_url(process))
    try:
        ack = await client.request({"type": "create", "kind": "demo", "scope": "project:1",
                                    "input": input_, "subscribe": True})
        await client.until(lambda f: f["type"] == "update" and f["event"]["type"] == "task.completed")
    finally:
        await client.close()
    return str(ack["task"])


async def test_a_task_is_one_trace_from_create_through_runs_and_steps_to_its_end_published(
        taskcast: Process, spans: InMemorySpanExporter) -> None:
    """create, each run (the retried one too), each step a run ended, and the relay's
    publication of the task's end are spans of one trace, parented create > run > step."""
    task = await _run_demo(taskcast, {"steps": 2, "step_ms": 1, "fail_step": 2})

    def named(name: str) -> list[ReadableSpan]:
        return [s for s in spans.get_finished_spans()
                if s.name == name and s.attributes and s.attributes.get("taskcast.task") in (task, None)]

    await eventually(lambda: len(named("taskcast.publish")) == 1)
    [create] = named("taskcast.create")
    runs = named("taskcast.run")
    steps = [s for s in named("taskcast.step") if s.parent and s.parent.span_id in
             {r.context.span_id for r in runs}]
    assert create.context is not None
    trace_id = create.context.trace_id
    assert [r.attributes and r.attributes["taskcast.outcome"] for r in runs] == ["retrying", "completed"]
    assert all(r.parent is not None and r.parent.span_id == create.context.span_id for r in runs)
    assert sorted((s.attributes or {}).get("taskcast.status", "") for s in steps) == \
        ["completed", "completed", "failed"]  # step_1, step_2 failed once, then step_2
    spans_of_task = [create, *runs, *steps, *named("taskcast.publish")]
    assert {s.context.trace_id for s in spans_of_task if s.context} == {trace_id}


async def test_without_tracing_nothing_is_stored(taskcast: Process) -> None:
    """Tracing off (no tracer in use), a create writes no trace context."""
    await _run_demo(taskcast, {"steps": 1, "step_ms": 1})
    conn = await asyncpg.connect(taskcast.settings.database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM task_traces") == 0
    finally:
        await conn.close()
