"""HTTP: health, readiness, metrics and the dashboard, as a Starlette app.

The listener hands plain HTTP requests (anything but `/ws`) to `Http.respond`, which runs
the ASGI app for one request and returns the raw response bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from server.protocol.auth import origin_of
from server.settings import Settings

STATIC_DIR = Path(__file__).parents[1] / "static"  # the dashboard
READY_WITHIN_S = 3.0  # the relay publishes at least every second


Readiness = Callable[[], Awaitable[dict[str, bool]]]


class Http:
    def __init__(self, settings: Callable[[], Settings], readiness: Readiness,
                 metrics: Callable[[], Awaitable[str]]) -> None:
        self.settings = settings
        self.readiness = readiness
        self.render_metrics = metrics
        routes: list[Any] = [
            Route("/healthz", self.healthz),
            Route("/readyz", self.readyz),
            Route("/metrics", self.metrics),
        ]
        if STATIC_DIR.is_dir():
            routes.append(Mount("/", StaticFiles(directory=STATIC_DIR, html=True)))
        self.app = Starlette(routes=routes, middleware=[cors(settings())])

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "node": self.settings().node_id})

    async def readyz(self, request: Request) -> Response:
        checks = await self.readiness()
        return JSONResponse({"ready": all(checks.values()), "checks": checks},
                            status_code=200 if all(checks.values()) else 503)

    async def metrics(self, request: Request) -> Response:
        return PlainTextResponse(await self.render_metrics(), media_type="text/plain; version=0.0.4")

    async def respond(self, method: str, target: str, raw_head: bytes) -> bytes:
        """Run one request through the ASGI app; the raw HTTP/1.1 response."""
        path, _, query = target.partition("?")
        headers = [tuple(line.split(b":", 1)) for line in raw_head.split(b"\r\n")[1:] if b":" in line]
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
                 "query_string": query.encode(), "root_path": "",
                 "headers": [(k.strip().lower(), v.strip()) for k, v in headers],
                 "server": (self.settings().host, self.settings().port), "client": None}
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


def cors(settings: Settings) -> Middleware:
    """Pages of the origins that may open a socket (TASKCAST_ALLOWED_ORIGINS, the public
    URL's) may also load what this server serves: a module script from another origin, as
    `import "https://<node>/taskcast.js"` is, needs `Access-Control-Allow-Origin`."""
    origins = [o.lower().rstrip("/") for o in settings.allowed_origins]
    if settings.public_url and (public := origin_of(settings.public_url)):
        origins.append(public)
    return Middleware(CORSMiddleware, allow_origins=origins, allow_methods=("GET", "HEAD"))


_REASONS = {200: b"OK", 304: b"Not Modified", 404: b"Not Found", 405: b"Method Not Allowed",
            500: b"Internal Server Error", 503: b"Service Unavailable"}
