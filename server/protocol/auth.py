"""Who is on a socket, and what they may see: HS256 tokens with scope patterns.

A token's `scopes` are patterns (`project:42`, `repo:acme/*`, `*`); a principal may create
in, read and subscribe to a scope only when a pattern matches it (PROTOCOL.md, Auth).
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

import jwt

from events.errors import Forbidden, NotFound, Unauthorized

ALGORITHM = "HS256"


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: tuple[str, ...]
    expires_at: float | None = None
    _cache: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    def may(self, scope: str) -> bool:
        """Whether the principal holds `scope` (cached: `all` asks once per scope)."""
        known = self._cache.get(scope)
        if known is None:
            known = any(_match(p, scope) for p in self.scopes)
            if len(self._cache) < 4096:
                self._cache[scope] = known
        return known

    def require(self, scope: str) -> None:
        """Raises Forbidden unless the principal holds `scope` (a scope the client named
        itself: the message names nothing else)."""
        if not self.may(scope):
            raise Forbidden(f"scope {scope!r} is not granted to this token")

    def require_task(self, view: Mapping[str, Any]) -> None:
        """Raises NotFound, exactly as for a task that does not exist, unless the principal
        may read the task of `view`: a task's existence cannot be probed (PROTOCOL.md)."""
        if not self.may(view["scope"]):
            raise NotFound(not_found_message(view["id"]))


def not_found_message(task: str) -> str:
    """The one message of a missing (or invisible) task."""
    return f"no task {task}"


ANONYMOUS = Principal("anonymous", ("*",))


@lru_cache(maxsize=1024)
def _match(pattern: str, scope: str) -> bool:
    return pattern == "*" or pattern == scope or (
        any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(scope, pattern))


def origin_of(url: str) -> str | None:
    """The origin (`scheme://host[:port]`) of a URL, as browsers send it; None if it has none."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}".lower()


class Auth:
    def __init__(self, secret: str | None, allowed_origins: tuple[str, ...] = ()) -> None:
        self.secret = secret
        self.allowed_origins = allowed_origins

    def verify(self, token: str | None) -> Principal:
        """The principal of `token`. Without a secret (dev), everyone is ANONYMOUS.

        Raises Unauthorized for a missing, malformed, badly signed or expired token."""
        if self.secret is None:
            return ANONYMOUS
        if not token:
            raise Unauthorized("a token is required")
        try:
            claims = jwt.decode(token, self.secret, algorithms=[ALGORITHM],
                                options={"require": ["sub", "exp"]})
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {exc}") from None
        scopes = claims.get("scopes", [])
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise Unauthorized("invalid token: `scopes` must be a list of strings")
        return Principal(str(claims["sub"]), tuple(scopes), float(claims["exp"]))

    def origin_allowed(self, origin: str, own: tuple[str, ...] = ()) -> bool:
        """Whether a browser page of `origin` may open a socket: one of the configured
        origins (TASKCAST_ALLOWED_ORIGINS, `*` for any) or of the server's own (`own`: its
        public URL and its loopback addresses, where the dashboard it serves comes from).

        Never judged by the request's `Host` header, which the page's script controls
        through DNS (rebinding: evil.example resolving to 127.0.0.1 sends both `Origin` and
        `Host` as evil.example), with or without a secret."""
        if "*" in self.allowed_origins:
            return True
        origin = origin.lower()
        return origin in own or origin in (o.lower().rstrip("/") for o in self.allowed_origins)


def mint(secret: str, subject: str, scopes: list[str], *, ttl_s: float = 3600) -> str:
    """A signed token (for development and tests)."""
    return jwt.encode({"sub": subject, "scopes": scopes, "exp": int(time.time() + ttl_s)},
                      secret, algorithm=ALGORITHM)
