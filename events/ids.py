"""Identifiers: task ids, log positions and fencing tokens.

A position is the pair (transaction id, sequence number) of an event, packed into one int
so that comparing positions is comparing ints. On the wire it is an opaque string of 32
hex digits, which also sorts correctly as a string.
"""

from __future__ import annotations

import base64
import os
import re
import time
from typing import NewType

TaskId = NewType("TaskId", str)
Position = NewType("Position", int)
FenceToken = NewType("FenceToken", int)

ZERO = Position(0)
_SEQ_BITS = 64
_SEQ_MASK = (1 << _SEQ_BITS) - 1
_POSITION_CHARS = 32
_HEX = re.compile(r"[0-9a-f]+")
_BIGINT_MAX = 2**63 - 1


def position(xid: int, seq: int) -> Position:
    """Pack an event's transaction id and sequence number into a position."""
    return Position((xid << _SEQ_BITS) | seq)


def split(pos: Position) -> tuple[int, int]:
    """The (xid, seq) pair of a position, for SQL parameters."""
    return pos >> _SEQ_BITS, pos & _SEQ_MASK


def encode(pos: Position) -> str:
    """The wire form of a position."""
    return f"{pos:032x}"


def decode(text: str) -> Position:
    """Parse a wire position strictly: 32 lowercase hex digits whose transaction id and
    sequence number each fit PostgreSQL's bigint. Raises ValueError when `text` is not one."""
    if len(text) != _POSITION_CHARS or _HEX.fullmatch(text) is None:
        raise ValueError("a position is 32 lowercase hex digits")
    pos = Position(int(text, 16))
    xid, seq = split(pos)
    if xid > _BIGINT_MAX or seq > _BIGINT_MAX:
        raise ValueError("a position's parts fit a bigint")
    return pos


def new_task_id() -> TaskId:
    """A new task id: `tsk_` + 48 bits of milliseconds + 80 random bits, base32, sortable."""
    raw = int(time.time() * 1000).to_bytes(6, "big") + os.urandom(10)
    return TaskId("tsk_" + base64.b32encode(raw).decode().lower().rstrip("="))
