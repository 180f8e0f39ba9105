"""HTTP: health, readiness, metrics and the dashboard, as a Starlette app.

The listener hands plain HTTP requests (anything but `/ws`) to `Http.respond`, which runs
the ASGI app for one request and returns the raw response bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from events.bound import Bound
from events.errors import Unavailable

if TYPE_CHECKING:
    from server.node import Node

STATIC_DIR = Path(__file__).parent / "static"
READY_WITHIN_S = 3.0  # the relay publishes at least every second
BOUND_WITHIN_S = 1.0  # /metrics answers without the read-bound lines rather than wait longer


class Http:
    def __init__(self, node: Node) -> None:
        self.node = node
        routes: list[Any] = [
            Route("/healthz", self.healthz),
            Route("/readyz", self.readyz),
            Route("/metrics", self.metrics),
        ]
        if STATIC_DIR.is_dir():
            routes.append(Mount("/", StaticFiles(directory=STATIC_DIR, html=True)))
        self.app = Starlette(routes=routes)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "node": self.node.settings.node_id})

    async def readyz(self, request: Request) -> Response:
        checks = await self.node.readiness()
        return JSONResponse({"ready": all(checks.values()), "checks": checks},
                            status_code=200 if all(checks.values()) else 503)

    async def metrics(self, request: Request) -> Response:
        bound: tuple[Bound, int] | None = None
        try:
            async with asyncio.timeout(BOUND_WITHIN_S):
                now = await self.node.log.bound()
                bound = now, await self.node.log.events_behind(now)
        except (Unavailable, TimeoutError):
            pass  # PostgreSQL is down or slow: the other lines still answer
        return PlainTextResponse(self.node.metrics.render(self.node, bound),
                                 media_type="text/plain; version=0.0.4")

    async def respond(self, method: str, target: str, raw_head: bytes) -> bytes:
        """Run one request through the ASGI app; the raw HTTP/1.1 response."""
        path, _, query = target.partition("?")
        headers = [tuple(line.split(b":", 1)) for line in raw_head.split(b"\r\n")[1:] if b":" in line]
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
                 "query_string": query.encode(), "root_path": "",
                 "headers": [(k.strip().lower(), v.strip()) for k, v in headers],
                 "server": (self.node.settings.host, self.node.settings.port), "client": None}
        status = 500
        out_headers: list[tuple[bytes, bytes]] = []
        body: list[bytes] = []

        requested = False

        async def receive() -> dict[str, Any]:
            # The body once; then block like a connection that stays open (the app's task is
            # done when the response is). Returning at once again made Starlette's
            # FileResponse spin on receive() waiting for a disconnect, freezing the loop.
            nonlocal requested
            if requested:
                await asyncio.Future()
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                out_headers.extend(message.get("headers", []))
            elif message["type"] == "http.response.body":
                body.append(message.get("body", b""))

        await self.app(scope, receive, send)
        payload = b"" if method == "HEAD" else b"".join(body)
        lines = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Status"))]
        lines += [k + b": " + v for k, v in out_headers if k.lower() not in (b"connection",)]
        lines.append(b"connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n" + payload


_REASONS = {200: b"OK", 304: b"Not Modified", 404: b"Not Found", 405: b"Method Not Allowed",
            500: b"Internal Server Error", 503: b"Service Unavailable"}


class Metrics:
    """Counters for /metrics (Prometheus text format)."""

    ACK_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

    def __init__(self) -> None:
        self.started = time.time()
        self.frames_in = 0
        self.frames_out = 0
        self.resyncs = 0
        self.acks = 0
        self.ack_buckets = [0] * len(self.ACK_BUCKETS_S)
        self.ack_seconds = 0.0

    def observe_ack(self, seconds: float) -> None:
        self.acks += 1
        self.ack_seconds += seconds
        for i, bound in enumerate(self.ACK_BUCKETS_S):
            if seconds <= bound:
                self.ack_buckets[i] += 1

    def render(self, node: Node, read_bound: tuple[Bound, int] | None = None) -> str:
        """The text format; `read_bound` is the log's read bound and the events it holds back."""
        lines = [
            "# TYPE taskcast_connections gauge",
            f"taskcast_connections {len(node.connections)}",
            "# TYPE taskcast_subscriptions gauge",
            f"taskcast_subscriptions {node.hub.subscription_count()}",
            "# TYPE taskcast_frames_in_total counter",
            f"taskcast_frames_in_total {self.frames_in}",
            "# TYPE taskcast_frames_out_total counter",
            f"taskcast_frames_out_total {self.frames_out}",
            "# TYPE taskcast_updates_routed_total counter",
            f"taskcast_updates_routed_total {node.hub.routed}",
            "# TYPE taskcast_resyncs_total counter",
            f"taskcast_resyncs_total {self.resyncs}",
            "# TYPE taskcast_gaps_filled_total counter",
            f"taskcast_gaps_filled_total {node.fanout.gaps_filled}",
            "# TYPE taskcast_relay_lag_seconds gauge",
            f"taskcast_relay_lag_seconds {node.fanout.relay_lag_s:.6f}",
            "# TYPE taskcast_relay_last_message_age_seconds gauge",
            f"taskcast_relay_last_message_age_seconds "
            f"{time.monotonic() - node.fanout.last_message_at:.3f}",
            "# TYPE taskcast_ack_seconds histogram",
        ]
        for bound, count in zip(self.ACK_BUCKETS_S, self.ack_buckets, strict=True):
            lines.append(f'taskcast_ack_seconds_bucket{{le="{bound}"}} {count}')
        lines += [f'taskcast_ack_seconds_bucket{{le="+Inf"}} {self.acks}',
                  f"taskcast_ack_seconds_sum {self.ack_seconds}",
                  f"taskcast_ack_seconds_count {self.acks}"]
        if read_bound is not None:
            lines += bound_lines(*read_bound)
        return "\n".join(lines) + "\n"


def bound_lines(bound: Bound, behind: int) -> list[str]:
    """How far the log's read bound is behind the head, and which taskcast writer holds it
    (invariant 10: only those can). The holder's gauges are 0 while nothing holds it;
    the cluster xmin lag is what v1's bound would lag (foreign transactions included)."""
    holder = bound.holder
    gauges = [
        ("taskcast_read_bound_lag_xids", bound.lag_xids),
        ("taskcast_read_bound_events_behind", behind),
        ("taskcast_read_bound_writers", len(bound.writers)),
        ("taskcast_read_bound_holder_age_seconds", f"{holder.age_s:.3f}" if holder else 0),
        ("taskcast_read_bound_holder_pid", holder.pid if holder else 0),
        ("taskcast_read_bound_holder_xid", holder.xid if holder else 0),
        ("taskcast_cluster_xmin_lag_xids", bound.head - bound.cluster_xmin),
    ]
    return [line for name, value in gauges for line in (f"# TYPE {name} gauge", f"{name} {value}")]
