"""HTTP: health, readiness, metrics, the API's routes and the dashboard, as a Starlette app.

Each plain HTTP request (anything but `/ws`) runs through `Http.app`, served over HTTP/1.1
by server/transport/http11.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from events.errors import TaskcastError
from server.protocol.auth import origin_of
from server.settings import Settings

if TYPE_CHECKING:
    from server.services import Services

STATIC_DIR = Path(__file__).parents[1] / "static"  # the dashboard
READY_WITHIN_S = 3.0  # the relay publishes at least every second


Readiness = Callable[[], Awaitable[dict[str, bool]]]


class Http:
    def __init__(self, services: Services, readiness: Readiness,
                 metrics: Callable[[], Awaitable[str]], api: Sequence[BaseRoute] = ()) -> None:
        self.services = services
        self.readiness = readiness
        self.render_metrics = metrics
        routes: list[Any] = [
            Route("/healthz", self.healthz),
            Route("/readyz", self.readyz),
            Route("/metrics", self.metrics),
            *api,  # server/transport/api.py
        ]
        if STATIC_DIR.is_dir():
            routes.append(Mount("/", StaticFiles(directory=STATIC_DIR, html=True)))
        self.app = Starlette(routes=routes, middleware=[cors(services.settings)])

    def settings(self) -> Settings:
        return self.services.settings

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "node": self.settings().node_id})

    async def readyz(self, request: Request) -> Response:
        checks = await self.readiness()
        return JSONResponse({"ready": all(checks.values()), "checks": checks},
                            status_code=200 if all(checks.values()) else 503)

    async def metrics(self, request: Request) -> Response:
        return PlainTextResponse(await self.render_metrics(), media_type="text/plain; version=0.0.4")


STATUS = {"bad_request": 400, "unauthorized": 401, "forbidden": 403, "not_found": 404,
          "conflict": 409, "too_large": 413, "rate_limited": 429, "unavailable": 503,
          "internal": 500}


def problem(exc: TaskcastError) -> Response:
    """An error as a problem document (RFC 9457) carrying the protocol's error code."""
    status = STATUS.get(exc.code, 500)
    headers = {}
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    if exc.retryable:
        headers["retry-after"] = "1"
    return JSONResponse({"type": "about:blank", "title": exc.code.replace("_", " "), "status": status,
                         "code": exc.code, "message": str(exc), "retryable": exc.retryable},
                        status_code=status, headers=headers, media_type="application/problem+json")


def cors(settings: Settings) -> Middleware:
    """Pages of the origins that may open a socket (TASKCAST_ALLOWED_ORIGINS, the public
    URL's) may also load what this server serves: a module script from another origin, as
    `import "https://<node>/taskcast.js"` is, needs `Access-Control-Allow-Origin`."""
    origins = [o.lower().rstrip("/") for o in settings.allowed_origins]
    if settings.public_url and (public := origin_of(settings.public_url)):
        origins.append(public)
    return Middleware(CORSMiddleware, allow_origins=origins, allow_methods=("GET", "HEAD"))
