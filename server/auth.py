"""Who is on a socket, and what they may see: HS256 tokens with scope patterns.

A token's `scopes` are patterns (`project:42`, `repo:acme/*`, `*`); a principal may create
in, read and subscribe to a scope only when a pattern matches it (PROTOCOL.md, Auth).
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field
from functools import lru_cache

import jwt

from events.errors import Forbidden, Unauthorized

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
        """Raises Forbidden unless the principal holds `scope`."""
        if not self.may(scope):
            raise Forbidden(f"scope {scope!r} is not granted to {self.name!r}")


ANONYMOUS = Principal("anonymous", ("*",))


@lru_cache(maxsize=1024)
def _match(pattern: str, scope: str) -> bool:
    return pattern == "*" or pattern == scope or (
        any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(scope, pattern))


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

    def origin_allowed(self, origin: str, host: str | None = None) -> bool:
        """Browser origins: any in dev; with a secret, the page's own origin (the dashboard
        this server serves) and the configured ones."""
        if self.secret is None and not self.allowed_origins:
            return True
        if host is not None and origin.split("://", 1)[-1] == host:
            return True
        return origin in self.allowed_origins or "*" in self.allowed_origins


def mint(secret: str, subject: str, scopes: list[str], *, ttl_s: float = 3600) -> str:
    """A signed token (for development and tests)."""
    return jwt.encode({"sub": subject, "scopes": scopes, "exp": int(time.time() + ttl_s)},
                      secret, algorithm=ALGORITHM)
