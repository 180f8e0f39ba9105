"""All configuration, in one frozen object built once by the CLI and passed down."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Settings:
    database_url: str = ""
    redis_url: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    node_id: str = ""
    channel: str = "taskcast:events"  # the relay's Redis channel
    secret: str | None = None  # HS256 secret; None: no auth (dev)
    allowed_origins: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()  # extra kinds, "package.module:attr"
    shell_allow: tuple[str, ...] = ()  # commands the `shell` kind may run; none: disabled
    # Where the built-in kinds keep each scope's files (TASKCAST_WORKSPACE_ROOT); "" : none,
    # and then those kinds fail (`taskcast worker` refuses to start; `taskcast dev` defaults
    # it to <data dir>/workspaces).
    workspace_root: str = ""
    clone_roots: tuple[str, ...] = ()  # local paths git.clone may read (TASKCAST_CLONE_ROOTS)
    # limits (PROTOCOL.md: welcome.limits)
    max_frame_bytes: int = 256 * 1024
    max_subscriptions: int = 100
    rate_per_s: int = 1000
    max_connections_per_principal: int = 1000
    hello_timeout_s: float = 10.0
    heartbeat_s: float = 25.0
    send_buffer_bytes: int = 256 * 1024  # past this a subscription gets `resync`
    send_buffer_hard_bytes: int = 1024 * 1024  # past this the socket is closed (4429)
    max_inflight: int = 32  # concurrent commands/queries per socket before reading pauses
    # workers
    workers: int = 2
    worker_concurrency: int = 8
    lease_s: float = 30.0
    cancel_grace_s: float = 5.0
    scope_limit: int | None = None  # running tasks per scope (TASKCAST_SCOPE_LIMIT)
    retention_s: float = 7 * 24 * 3600.0  # history of ended tasks kept (TASKCAST_RETENTION_S)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)


def from_env(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from environment variables (TASKCAST_*, DATABASE_URL, REDIS_URL) and flags."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {
        "database_url": env.get("DATABASE_URL", ""),
        "redis_url": env.get("REDIS_URL", ""),
        "secret": env.get("TASKCAST_SECRET") or None,
        "allowed_origins": tuple(o for o in env.get("TASKCAST_ALLOWED_ORIGINS", "").split(",") if o),
        "kinds": tuple(k for k in env.get("TASKCAST_KINDS", "").split(",") if k),
        "shell_allow": tuple(c.strip() for c in env.get("TASKCAST_SHELL_ALLOW", "").split(",") if c.strip()),
        "workspace_root": env.get("TASKCAST_WORKSPACE_ROOT", ""),
        "clone_roots": tuple(r for r in env.get("TASKCAST_CLONE_ROOTS", "").split(os.pathsep) if r),
    }
    if env.get("TASKCAST_LEASE_S"):
        values["lease_s"] = float(env["TASKCAST_LEASE_S"])
    if env.get("TASKCAST_MAX_CONNECTIONS_PER_PRINCIPAL"):
        values["max_connections_per_principal"] = int(env["TASKCAST_MAX_CONNECTIONS_PER_PRINCIPAL"])
    if env.get("TASKCAST_RETENTION_S"):
        values["retention_s"] = float(env["TASKCAST_RETENTION_S"])
    if env.get("TASKCAST_SCOPE_LIMIT"):
        values["scope_limit"] = int(env["TASKCAST_SCOPE_LIMIT"])
    if "TASKCAST_CHANNEL" in env:
        values["channel"] = env["TASKCAST_CHANNEL"]
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)
