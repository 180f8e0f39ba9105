"""Client frames: decoded and checked once, at the edge (PROTOCOL.md).

Pure. `decode` turns a text message into a `Request` or raises `FrameError`, which carries
the frame's `id` whenever it could be read, so the error can echo it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

MAX_ID_CHARS = 64
MAX_KEY_CHARS = 200

Check = Callable[[Any], bool]


def _str(v: Any) -> bool:
    return isinstance(v, str)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _object(v: Any) -> bool:
    return isinstance(v, dict)


def _strings(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _key(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= MAX_KEY_CHARS


def _any(v: Any) -> bool:
    return True


_TYPE_NAMES: dict[Check, str] = {
    _str: "a string", _int: "an integer", _number: "a number", _bool: "a boolean",
    _object: "an object", _strings: "a list of strings",
    _key: f"a string of 1..{MAX_KEY_CHARS} chars", _any: "any JSON",
}

# type -> (required fields, optional fields)
SCHEMA: dict[str, tuple[dict[str, Check], dict[str, Check]]] = {
    "hello": ({}, {"token": _str, "client": _str}),
    "ping": ({}, {}),
    "refresh": ({"token": _str}, {}),
    "create": ({"kind": _str, "scope": _str, "input": _object},
               {"labels": _strings, "depends_on": _strings, "timeout_s": _number,
                "priority": _int, "subscribe": _bool, "key": _key}),
    "cancel": ({"task": _str}, {"reason": _str, "key": _key}),
    "answer": ({"task": _str, "question": _str, "answer": _any}, {"key": _key}),
    "retry": ({"task": _str}, {"key": _key}),
    "get": ({"task": _str}, {}),
    "list": ({}, {"scope": _str, "status": _strings, "kind": _str, "label": _str,
                  "limit": _int, "cursor": _str}),
    "history": ({"task": _str}, {"after": _int, "limit": _int}),
    "subscribe": ({"channel": _str}, {"since": _str, "snapshot": _bool}),
    "unsubscribe": ({"channel": _str}, {}),
}
NO_ANSWER = frozenset({"pong"})  # frames that expect no answer, hence carry no id

RequestId = int | str


class FrameError(Exception):
    """A frame the protocol does not accept (answered with `bad_request`)."""

    def __init__(self, message: str, id_: RequestId | None = None) -> None:
        super().__init__(message)
        self.id = id_


@dataclass(frozen=True, slots=True)
class Request:
    type: str
    id: RequestId | None
    fields: dict[str, Any]


def _readable_id(obj: dict[str, Any]) -> RequestId | None:
    id_ = obj.get("id")
    if isinstance(id_, bool):
        return None
    if isinstance(id_, int) or (isinstance(id_, str) and len(id_) <= MAX_ID_CHARS):
        return id_
    return None


def decode(message: bytes | str) -> Request:
    """Parse and check one client text message. Raises FrameError."""
    try:
        obj = orjson.loads(message)
    except orjson.JSONDecodeError:
        raise FrameError("invalid JSON") from None
    if not isinstance(obj, dict):
        raise FrameError("a frame is a JSON object")
    id_ = _readable_id(obj)
    type_ = obj.get("type")
    if not isinstance(type_, str):
        raise FrameError("a frame needs a string `type`", id_)
    if type_ in NO_ANSWER:
        return Request(type_, id_, obj)
    if type_ not in SCHEMA:
        raise FrameError(f"unknown frame type {type_!r}", id_)
    if id_ is None:
        raise FrameError(f"`{type_}` needs an `id` (an int, or a string of at most {MAX_ID_CHARS} chars)")
    required, optional = SCHEMA[type_]
    for name, check in required.items():
        if name not in obj:
            raise FrameError(f"`{type_}` needs `{name}`", id_)
        if not check(obj[name]):
            raise FrameError(f"`{name}` must be {_TYPE_NAMES[check]}", id_)
    for name, check in optional.items():
        if name in obj and obj[name] is not None and not check(obj[name]):
            raise FrameError(f"`{name}` must be {_TYPE_NAMES[check]}", id_)
    return Request(type_, id_, obj)
