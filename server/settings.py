"""All configuration, in one frozen object built once (by the CLI, from flags and the
environment) and passed down; every other config object is built from it.

Each field is read from one environment variable: `DATABASE_URL`, `REDIS_URL`, and
`TASKCAST_<FIELD>` for the rest (`TASKCAST_LEASE_S`, `TASKCAST_RATE_PER_S`, ...; lists are
comma-separated). Defaults live with the code they configure (WorkerConfig, RelayConfig,
FrameLimits) and are referred to here, never repeated. `from_env` checks every value and
raises SettingsError naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from events.relay.bus import check_url
from events.relay.publisher import RelayConfig
from events.worker import WorkerConfig
from server.protocol.frames import DEFAULT_LIMITS, ENCODABLE_DEPTH, FrameLimits

_W = WorkerConfig()


class SettingsError(ValueError):
    """A setting that cannot be used; the message names its variable."""


@dataclass(frozen=True)
class Settings:
    database_url: str = ""
    redis_url: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    node_id: str = ""
    channel: str = "taskcast:events"  # the relay's Redis channel
    secret: str | None = None  # HS256 secret; None: no auth (development on loopback)
    allowed_origins: tuple[str, ...] = ()  # browser origins allowed besides the server's own
    public_url: str | None = None  # where browsers reach this server (its origin is allowed)
    kinds: tuple[str, ...] = ()  # extra kinds, "package.module:attr"
    shell_allow: tuple[str, ...] = ()  # commands the `shell` kind may run; none: disabled
    # Where the built-in kinds keep each scope's files; "": none, and then those kinds fail
    # (`taskcast worker` refuses to start; `taskcast dev` defaults it to <data dir>/workspaces).
    workspace_root: str = ""
    clone_roots: tuple[str, ...] = ()  # local paths git.clone may read (`:`-separated)
    # the gateway's limits (PROTOCOL.md, Limits)
    max_frame_bytes: int = 256 * 1024
    max_subscriptions: int = 100
    rate_per_s: int = 1000
    max_connections_per_principal: int = 1000
    hello_timeout_s: float = 10.0
    heartbeat_s: float = 25.0
    send_buffer_bytes: int = 256 * 1024  # past this a subscription gets `resync`
    send_buffer_hard_bytes: int = 1024 * 1024  # past this the socket is closed (4429)
    max_inflight: int = 32  # concurrent commands/queries per socket before reading pauses
    max_http_body_bytes: int = 1024 * 1024  # a plain HTTP request's body (413 beyond)
    http_idle_s: float = 5.0  # a kept-alive HTTP connection's wait for its next request
    max_input_bytes: int = DEFAULT_LIMITS.max_input_bytes
    max_json_depth: int = DEFAULT_LIMITS.max_json_depth
    # workers
    workers: int = 2  # worker loops in a `taskcast dev` process
    worker_concurrency: int = _W.concurrency
    lease_s: float = _W.lease_s
    cancel_grace_s: float = _W.cancel_grace_s
    drain_grace_s: float = _W.drain_grace_s
    scope_limit: int | None = _W.scope_limit
    retention_s: float | None = _W.retention_s  # history of ended tasks kept (None: forever)
    # `taskcast serve`: node processes on the port (None: one per core), and whether this
    # node binds it with SO_REUSEPORT (set for the children of `--processes`; also lets a
    # new node take the port over while the old one drains)
    processes: int | None = None
    reuse_port: bool = False
    # every process
    stop_timeout_s: float = 10.0  # each stage of a stop, beyond the drain grace
    # GET /metrics of the relay and of the workers of a process, on `host` (0: not served)
    relay_metrics_port: int = 0
    worker_metrics_port: int = 0

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def frame_limits(self) -> FrameLimits:
        return FrameLimits(max_input_bytes=self.max_input_bytes, max_json_depth=self.max_json_depth)

    def worker_config(self) -> WorkerConfig:
        return WorkerConfig(concurrency=self.worker_concurrency, lease_s=self.lease_s,
                            cancel_grace_s=self.cancel_grace_s, scope_limit=self.scope_limit,
                            retention_s=self.retention_s, drain_grace_s=self.drain_grace_s,
                            stop_s=self.stop_timeout_s, workspace_root=self.workspace_root)

    def relay_config(self) -> RelayConfig:
        return RelayConfig(channel=self.channel)

    def check(self) -> Settings:
        """Raise SettingsError for a value no process could run with; return self."""
        for f in fields(self):
            value = getattr(self, f.name)
            numeric = str(f.type).replace(" | None", "") in ("int", "float")
            rule = _RULES.get(f.name, _positive if numeric else None)
            if rule is not None and value is not None and not rule(value):
                raise SettingsError(f"{env_name(f.name)}={value!r}: {_RULE_TEXT[rule]}")
        if self.redis_url:
            try:
                check_url(self.redis_url)
            except ValueError as exc:
                raise SettingsError(f"{env_name('redis_url')}: {exc}") from None
        return self


def _positive(v: Any) -> bool:
    return bool(v > 0)


def _port(v: Any) -> bool:
    return bool(0 <= v <= 65535)


def _origin_list(v: Any) -> bool:
    return all(o == "*" or o == "null" or "://" in o for o in v)


def _json_depth(v: Any) -> bool:
    return bool(1 <= v <= ENCODABLE_DEPTH)


_RULES: dict[str, Callable[[Any], bool]] = {"port": _port, "relay_metrics_port": _port,
                                            "worker_metrics_port": _port, "allowed_origins": _origin_list,
                                            "scope_limit": _positive, "processes": _positive,
                                            "max_json_depth": _json_depth}
_RULE_TEXT: dict[Callable[[Any], bool], str] = {
    _positive: "must be a positive number", _port: "must be a port (0..65535)",
    _origin_list: "each must be an origin (scheme://host[:port]), `null` or `*`",
    _json_depth: f"must be in 1..{ENCODABLE_DEPTH} (the deepest JSON the server can encode)"}
_ENV = {"database_url": "DATABASE_URL", "redis_url": "REDIS_URL"}


def env_name(field: str) -> str:
    """The environment variable of a field."""
    return _ENV.get(field, "TASKCAST_" + field.upper())


_SEPARATORS = {"clone_roots": os.pathsep}  # lists of paths, like PATH; other lists: commas


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True,
             "0": False, "false": False, "no": False, "off": False}


def _parse(name: str, kind: str, raw: str) -> Any:
    kind = kind.replace(" | None", "")
    if kind == "bool":
        if raw.strip().lower() not in _BOOLEANS:
            raise ValueError(raw)
        return _BOOLEANS[raw.strip().lower()]
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind == "tuple[str, ...]":
        return tuple(part.strip() for part in raw.split(_SEPARATORS.get(name, ",")) if part.strip())
    return raw


def from_env(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from the environment, then `overrides` (flags; None means "not given").
    Raises SettingsError naming the variable of a value that is not acceptable."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in fields(Settings):
        raw = env.get(env_name(f.name))
        if raw is None or (raw == "" and f.type != "str"):
            continue
        try:
            values[f.name] = _parse(f.name, str(f.type), raw)
        except ValueError:
            expected = "a boolean (1/0, true/false, yes/no, on/off)" if f.type == "bool" else f.type
            raise SettingsError(f"{env_name(f.name)}={raw!r}: must be {expected}") from None
    if values.get("secret") == "":
        values["secret"] = None
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values).check()
