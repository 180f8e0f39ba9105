"""Task kinds: async workflows of named steps. See `events.runtime.TaskContext` for the API."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from events.runtime import TaskContext

Kind = Callable[[TaskContext], Awaitable[Any]]


def builtin() -> dict[str, Kind]:
    """The kinds that ship with taskcast, by name."""
    from events.kinds.demo import demo

    return {"demo": demo}
