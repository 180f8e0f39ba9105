"""Where the built-in kinds may touch the disk: one directory per scope under the workspace root.

    <workspace root>/<slug>-<hash>/        the scope's directory (`scope_dirname`)

The workspace root is a setting (Settings.workspace_root, TASKCAST_WORKSPACE_ROOT; under
`taskcast dev` `./.taskcast/workspaces`). Every path a built-in kind takes (`dest`,
`repo`, `cwd`, `root`, a local clone `url`) is relative to its task's scope directory, and
is checked twice (invariant 9):
- `relative(value, field)`: lexical and pure, run by `validate` at the ack: a string of
  printable characters, not absolute, no `..` that climbs out. A failure is `bad_request`.
- `resolve(base, path)`: on the worker's disk, by real path (symlinks and `..` resolved):
  what lands outside the scope's directory fails the task (`Escape`), since only the
  worker can see where a symlink points.
The scope's directory name is a readable slug of the scope plus a hash of the whole scope:
safe on any filesystem, and two scopes never share one (`a/b` and `a-b` slug alike).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from pathlib import Path

from events.errors import BadRequest
from events.kind import StepError

MAX_PATH_CHARS = 1024
SLUG_CHARS = 40
HASH_CHARS = 16  # 64 bits of sha256: no two scopes meet by accident
_NOT_SLUG = re.compile(r"[^a-z0-9]+")


class Escape(StepError):
    """A path that resolves outside the scope's directory (a symlink, `..`). Not retryable."""


def scope_dirname(scope: str) -> str:
    """The name of `scope`'s directory under the workspace root (pure)."""
    slug = _NOT_SLUG.sub("-", scope.lower()).strip("-")[:SLUG_CHARS].strip("-") or "scope"
    return f"{slug}-{hashlib.sha256(scope.encode()).hexdigest()[:HASH_CHARS]}"


def relative(value: object, what: str, *, dot: bool = True) -> str:
    """`value` as a normalized path relative to the scope's directory; `dot`: whether the
    directory itself (".") is acceptable. Pure. Raises BadRequest naming `what`."""
    if not isinstance(value, str) or not value or len(value) > MAX_PATH_CHARS or not value.isprintable():
        raise BadRequest(f"{what} must be a relative path of 1..{MAX_PATH_CHARS} printable characters")
    normal = posixpath.normpath(value)
    if posixpath.isabs(value) or normal == ".." or normal.startswith("../"):
        raise BadRequest(f"{what} must be a relative path inside the scope's workspace")
    if normal == "." and not dot:
        raise BadRequest(f"{what} must name a directory inside the scope's workspace, not the workspace")
    return normal


def contains(base: str | Path, path: str | Path) -> bool:
    """Whether `path` is `base` or below it (both already real paths)."""
    base, path = os.fspath(base), os.fspath(path)
    return path == base or path.startswith(base.rstrip("/") + "/")


def scope_dir(root: str, scope: str) -> Path:
    """The scope's directory, created if need be (blocking: call it in a thread); its real
    path. Raises StepError when no workspace root is configured."""
    if not root:
        raise StepError("no workspace root is configured (TASKCAST_WORKSPACE_ROOT)")
    base = Path(os.path.realpath(root)) / scope_dirname(scope)
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    return base


def resolve(base: Path, path: str, what: str) -> Path:
    """The real path of `path` (relative, already `relative`-checked) inside `base`, which
    need not exist yet. Blocking. Raises Escape when it lands outside `base`."""
    real = Path(os.path.realpath(base / path))
    if not contains(base, real):
        raise Escape(f"{what} {path!r} resolves outside the scope's workspace")
    return real
