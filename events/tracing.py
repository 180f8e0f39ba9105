"""Optional OpenTelemetry tracing of a task, from `create` to the publication of its end.

One trace per task: the node's `taskcast.create` span (the command, until committed);
each worker run, `taskcast.run` (from its claim to its end), with a `taskcast.step` child
per step the run ended, timed from the view; the relay's `taskcast.publish` of the task's
terminal event (from its commit to its publication). The context crosses processes in
`task_traces` (migrations/0005_task_traces.sql): the node writes the create span's W3C
`traceparent` before the task commits, so no claim can miss it; workers and relays read it.

Off unless a tracer is in `use`: `configure` (the CLI, at start) turns it on when an OTEL_*
variable asks for it and the SDK is importable (the `otel` extra), exporting as those
variables say; a provider already set globally (`opentelemetry-instrument`) is used as it
is. Off, OpenTelemetry is not even imported (a process starts as fast as without it),
nothing here costs more than a None check, and nothing is written. Tracing never fails a
task: an error of its own is logged and dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING

from events import db
from events.fold import View, ended_steps
from events.model import Event, EventType
from events.sql import q

log = logging.getLogger("taskcast.tracing")

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer, TracerProvider
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

READ_S = 1.0  # a read of stored contexts gives up after this (the span then has no parent)
E = EventType
ENDS = frozenset({E.TASK_COMPLETED, E.TASK_FAILED, E.TASK_CANCELLED, E.TASK_TIMED_OUT})

_tracer: Tracer | None = None  # while tracing is on


def use(provider: TracerProvider | None) -> None:
    """Trace with `provider`; None: tracing off."""
    global _tracer
    _tracer = None if provider is None else provider.get_tracer("taskcast")


def configure(service: str, env: Mapping[str, str]) -> None:
    """Turn tracing on for this process when `env` has an OTEL_* variable, says neither
    OTEL_SDK_DISABLED=true nor OTEL_TRACES_EXPORTER=none, and the SDK is importable. The
    exporter is OTEL_TRACES_EXPORTER (`otlp`, the default, needs
    opentelemetry-exporter-otlp-proto-http; or `console`); the service is OTEL_SERVICE_NAME,
    else `service`; the rest is the SDK's own OTEL_* settings (endpoint, sampling, ...)."""
    name = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if not any(key.startswith("OTEL_") for key in env) or name == "none" \
            or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
    except ImportError:
        log.warning("tracing off: the OTEL_* variables ask for it, but the OpenTelemetry SDK is "
                    "not installed (pip install 'taskcast[otel]')")
        return
    current = trace.get_tracer_provider()
    if not isinstance(current, trace.ProxyTracerProvider):  # set up by the application
        use(current)
        return
    exporter: SpanExporter
    if name == "console":
        exporter = ConsoleSpanExporter()
    elif name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning("tracing off: OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp-proto-http")
            return
        exporter = OTLPSpanExporter()
    else:
        log.warning("tracing off: OTEL_TRACES_EXPORTER=%r is not otlp, console or none", name)
        return
    resource = Resource.create({} if "OTEL_SERVICE_NAME" in env else {"service.name": service})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    use(provider)


@asynccontextmanager
async def creating(pool: db.Pool, task: str, kind: str, scope: str) -> AsyncIterator[None]:
    """The span of a `create`; its context is stored for the task before the task commits
    (one that cannot be stored leaves the task untraced: the create goes on)."""
    if _tracer is None:
        yield
        return
    from opentelemetry.trace import SpanKind

    with _tracer.start_as_current_span("taskcast.create", kind=SpanKind.PRODUCER, attributes={
            "taskcast.task": task, "taskcast.kind": kind, "taskcast.scope": scope}):
        carrier: dict[str, str] = {}
        _propagator().inject(carrier)
        try:
            if "traceparent" in carrier:  # a valid span context (sampled or not)
                async with asyncio.timeout(READ_S), db.acquire(pool) as conn:
                    await conn.execute(q("remember_trace"), task, carrier["traceparent"])
        except Exception as exc:  # the task is created untraced (the create says if it cannot be)
            log.warning("cannot store the trace context of %s: %s", task, exc)
        yield


class Run:
    """A run's span (or nothing, tracing off): `ended` records how it ended, and its steps."""

    def __init__(self, tracer: Tracer | None = None, span: Span | None = None) -> None:
        self.tracer = tracer
        self.span = span

    def ended(self, outcome: str, before: View, after: View) -> None:
        if self.tracer is None or self.span is None:
            return
        from opentelemetry.trace import set_span_in_context

        self.span.set_attribute("taskcast.outcome", outcome)
        parent = set_span_in_context(self.span)
        for step in ended_steps(before, after):
            if step.get("started_at") and step.get("ended_at"):
                span = self.tracer.start_span("taskcast.step", parent, start_time=_ns(step["started_at"]),
                                          attributes={"taskcast.step": step["name"],
                                                      "taskcast.status": step["status"]})
                span.end(end_time=_ns(step["ended_at"]))


@asynccontextmanager
async def running(pool: db.Pool, task: str, kind: str, attempt: int) -> AsyncIterator[Run]:
    """The span of one run of a claimed task, a child of its create's."""
    tracer = _tracer
    if tracer is None:
        yield Run()
        return
    from opentelemetry.trace import SpanKind

    parents = await _stored(pool, [task])
    with tracer.start_as_current_span("taskcast.run", parents.get(task), kind=SpanKind.CONSUMER,
                                      attributes={"taskcast.task": task, "taskcast.kind": kind,
                                                  "taskcast.attempt": attempt}) as span:
        yield Run(tracer, span)


async def published(pool: db.Pool, events: Sequence[Event], at_ns: int) -> None:
    """A span for each task whose end is in a published batch: from its commit to `at_ns`."""
    tracer = _tracer
    if tracer is None:
        return
    ends = [e for e in events if e.type in ENDS]
    if not ends:
        return
    from opentelemetry.trace import SpanKind

    parents = await _stored(pool, [e.task for e in ends])
    for event in ends:
        if event.task in parents:
            span = tracer.start_span("taskcast.publish", parents[event.task], kind=SpanKind.PRODUCER,
                                      start_time=_ns(event.at),
                                      attributes={"taskcast.task": event.task, "taskcast.event": event.type})
            span.end(end_time=at_ns)


async def _stored(pool: db.Pool, tasks: list[str]) -> dict[str, Context]:
    """The stored contexts of `tasks` (those it can read within READ_S)."""
    try:
        async with asyncio.timeout(READ_S), db.acquire(pool) as conn:
            rows = await conn.fetch(q("traces"), tasks)
    except Exception as exc:  # the spans have no parent
        log.warning("cannot read the trace contexts of %s: %s", tasks, exc)
        return {}
    return {r["task_id"]: _propagator().extract({"traceparent": r["traceparent"]}) for r in rows}


def _propagator() -> TraceContextTextMapPropagator:
    """W3C trace context: the format of `task_traces` (whatever OTEL_PROPAGATORS says)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator()


def _ns(at: str) -> int:
    return int(datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp() * 1e9)
