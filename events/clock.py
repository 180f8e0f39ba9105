"""Wall-clock time as the log writes it. A seam so tests can inject time."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


def iso(moment: datetime) -> str:
    """`2026-11-21T10:00:00.000Z`: the protocol's timestamp form."""
    if moment.tzinfo is not UTC:  # asyncpg's and SystemClock's times are UTC already
        moment = moment.astimezone(UTC)
    return moment.isoformat(timespec="milliseconds")[:-6] + "Z"  # without its "+00:00"
