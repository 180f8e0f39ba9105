"""Client frames: decoded and checked once, at the edge (PROTOCOL.md, Limits).

Pure. `decode` turns a text message into a `Request` whose fields have all passed their
checks (type, length, range, JSON depth and size, no NUL or control characters), or
raises `FrameError`, which names the field and carries the frame's `id` whenever it could
be read, so the `bad_request` can echo it. Behind the edge nothing re-validates: a string
that reaches PostgreSQL cannot hold a NUL, a number cannot overflow a column or the clock,
and a JSON value is shallow and small enough that it can always be encoded again.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict

import orjson

from events.ids import Position
from events.ids import decode as decode_position
from events.model import Status

MAX_ID_CHARS = 64
MAX_KEY_CHARS = 200
MAX_SCOPE_CHARS = 200
MAX_KIND_CHARS = 100
MAX_LABELS = 32
MAX_LABEL_CHARS = 100
MAX_DEPENDS_ON = 100
MAX_TASK_ID_CHARS = 64
MAX_TOKEN_CHARS = 8192
MAX_CLIENT_CHARS = 200
MAX_TEXT_CHARS = 1000  # `reason`, `question`
MAX_CURSOR_CHARS = 512
MAX_TIMEOUT_S = 30 * 24 * 3600.0
PRIORITY_RANGE = (-32768, 32767)
MAX_LIST_LIMIT = 500
MAX_HISTORY_LIMIT = 1000
MAX_VERSION = 2**31 - 1


ENCODABLE_DEPTH = 254  # the deepest nesting orjson encodes (deeper: "Recursion limit reached")


@dataclass(frozen=True, slots=True)
class FrameLimits:
    """The settable limits of what a frame may carry (Settings builds one)."""

    max_input_bytes: int = 64 * 1024  # `input` of create, `answer` of answer, encoded
    max_json_depth: int = 32  # nesting of objects and arrays in `input` and `answer`

    def __post_init__(self) -> None:
        # Deeper than the encoder can go, a stored input could never be sent again.
        if not 1 <= self.max_json_depth <= ENCODABLE_DEPTH:
            raise ValueError(f"max_json_depth must be in 1..{ENCODABLE_DEPTH}")


DEFAULT_LIMITS = FrameLimits()

RequestId = int | str


class Invalid(Exception):
    """A field's value is not acceptable (the message completes "`field` ...")."""


class FrameError(Exception):
    """A frame the protocol does not accept (answered with `bad_request`)."""

    def __init__(self, message: str, id_: RequestId | None = None) -> None:
        super().__init__(message)
        self.id = id_


@dataclass(frozen=True, slots=True)
class Request:
    type: str
    id: RequestId | None
    fields: dict[str, Any]  # only the frame's known fields, each checked and normalized


# What each frame's `fields` hold once decoded (a handler reads them through these types).
class RefreshFields(TypedDict):
    token: str


class CreateFields(TypedDict):
    kind: str
    scope: str
    input: dict[str, Any]
    labels: NotRequired[list[str]]
    depends_on: NotRequired[list[str]]
    timeout_s: NotRequired[float]
    priority: NotRequired[int]
    subscribe: NotRequired[bool]
    key: NotRequired[str]


class TaskFields(TypedDict):  # cancel, retry, get
    task: str
    reason: NotRequired[str]
    key: NotRequired[str]


class AnswerFields(TypedDict):
    task: str
    question: str
    answer: Any
    key: NotRequired[str]


class ListFields(TypedDict, total=False):
    scope: str
    status: list[str]
    kind: str
    label: str
    limit: int
    cursor: str


class HistoryFields(TypedDict):
    task: str
    after: NotRequired[int]
    limit: NotRequired[int]


class SubscribeFields(TypedDict):
    channel: str
    since: NotRequired[Position]
    snapshot: NotRequired[bool]


Check = Callable[[Any, FrameLimits], Any]  # returns the normalized value or raises Invalid

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _text(max_chars: int, *, min_chars: int = 1, control: bool = False) -> Check:
    """A string of min..max chars, without NUL (and without any control character unless
    `control`: names, ids and scopes are single-line)."""
    def check(v: Any, _: FrameLimits) -> str:
        if not isinstance(v, str):
            raise Invalid("must be a string")
        if not min_chars <= len(v) <= max_chars:
            raise Invalid(f"must be {min_chars}..{max_chars} characters")
        if control:
            if "\x00" in v:
                raise Invalid("must not contain NUL")
        elif _CONTROL.search(v) is not None:
            raise Invalid("must not contain control characters")
        return v
    return check


def _list_of(item: Check, max_items: int) -> Check:
    def check(v: Any, limits: FrameLimits) -> list[Any]:
        if not isinstance(v, list):
            raise Invalid("must be a list")
        if len(v) > max_items:
            raise Invalid(f"must have at most {max_items} items")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(item(x, limits))
            except Invalid as exc:
                raise Invalid(f"item {i} {exc}") from None
        return out
    return check


def _int(low: int, high: int) -> Check:
    def check(v: Any, _: FrameLimits) -> int:
        if not isinstance(v, int) or isinstance(v, bool):
            raise Invalid("must be an integer")
        if not low <= v <= high:
            raise Invalid(f"must be in {low}..{high}")
        return v
    return check


def _timeout(v: Any, _: FrameLimits) -> float:
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise Invalid("must be a number")
    if not (math.isfinite(v) and 0 < v <= MAX_TIMEOUT_S):
        raise Invalid(f"must be a number of seconds in (0, {MAX_TIMEOUT_S:.0f}] (30 days)")
    return float(v)


def _bool(v: Any, _: FrameLimits) -> bool:
    if not isinstance(v, bool):
        raise Invalid("must be a boolean")
    return v


def _position(v: Any, _: FrameLimits) -> Position:
    if not isinstance(v, str):
        raise Invalid("must be a position string")
    try:
        return decode_position(v)
    except ValueError:
        raise Invalid("is not a position this server gave out") from None


def _status(v: Any, _: FrameLimits) -> str:
    if v not in Status.__members__.values():
        raise Invalid(f"must be one of {', '.join(s.value for s in Status)}")
    return str(v)


def json_problem(value: Any, limits: FrameLimits) -> str | None:
    """Why `value`, as `decode` parsed it, may not be stored as a task's input or an answer,
    or None. Checked here so that whatever is committed can be encoded again and stored
    (PostgreSQL's jsonb refuses NUL).

    The depth is walked first, iteratively: within `max_json_depth` (at most
    ENCODABLE_DEPTH) orjson encodes any value its decoder produced (string keys, valid
    UTF-8, 64-bit integers, finite floats), so encoding to measure the size cannot fail."""
    stack: list[tuple[Iterable[Any], int]] = [((value,), 0)]
    while stack:
        items, depth = stack.pop()
        for x in items:
            if isinstance(x, str):
                if "\x00" in x:
                    return "must not contain NUL characters"
            elif isinstance(x, dict):
                if depth >= limits.max_json_depth:
                    return f"is nested more than {limits.max_json_depth} levels"
                if any("\x00" in k for k in x):
                    return "must not contain NUL characters"
                stack.append((x.values(), depth + 1))
            elif isinstance(x, list):
                if depth >= limits.max_json_depth:
                    return f"is nested more than {limits.max_json_depth} levels"
                stack.append((x, depth + 1))
    size = len(orjson.dumps(value))
    if size > limits.max_input_bytes:
        return f"must encode to at most {limits.max_input_bytes} bytes of JSON (it is {size})"
    return None


def _json(*, object_only: bool) -> Check:
    def check(v: Any, limits: FrameLimits) -> Any:
        if object_only and not isinstance(v, dict):
            raise Invalid("must be an object")
        problem = json_problem(v, limits)
        if problem is not None:
            raise Invalid(problem)
        return v
    return check


_key = _text(MAX_KEY_CHARS)
_task = _text(MAX_TASK_ID_CHARS)

# type -> (required fields, optional fields); a field absent or null is not passed on
SCHEMA: dict[str, tuple[dict[str, Check], dict[str, Check]]] = {
    "hello": ({}, {"token": _text(MAX_TOKEN_CHARS, min_chars=0), "client": _text(MAX_CLIENT_CHARS,
                                                                                 min_chars=0)}),
    "ping": ({}, {}),
    "refresh": ({"token": _text(MAX_TOKEN_CHARS)}, {}),
    "create": ({"kind": _text(MAX_KIND_CHARS), "scope": _text(MAX_SCOPE_CHARS),
                "input": _json(object_only=True)},
               {"labels": _list_of(_text(MAX_LABEL_CHARS), MAX_LABELS),
                "depends_on": _list_of(_task, MAX_DEPENDS_ON), "timeout_s": _timeout,
                "priority": _int(*PRIORITY_RANGE), "subscribe": _bool, "key": _key}),
    "cancel": ({"task": _task}, {"reason": _text(MAX_TEXT_CHARS, min_chars=0, control=True),
                                 "key": _key}),
    "answer": ({"task": _task, "question": _text(MAX_TEXT_CHARS), "answer": _json(object_only=False)},
               {"key": _key}),
    "retry": ({"task": _task}, {"key": _key}),
    "get": ({"task": _task}, {}),
    "list": ({}, {"scope": _text(MAX_SCOPE_CHARS), "status": _list_of(_status, len(Status)),
                  "kind": _text(MAX_KIND_CHARS), "label": _text(MAX_LABEL_CHARS),
                  "limit": _int(1, MAX_LIST_LIMIT), "cursor": _text(MAX_CURSOR_CHARS)}),
    "history": ({"task": _task}, {"after": _int(0, MAX_VERSION), "limit": _int(1, MAX_HISTORY_LIMIT)}),
    "subscribe": ({"channel": _text(MAX_TASK_ID_CHARS + MAX_SCOPE_CHARS)},
                  {"since": _position, "snapshot": _bool}),
    "unsubscribe": ({"channel": _text(MAX_TASK_ID_CHARS + MAX_SCOPE_CHARS)}, {}),
}
NO_ANSWER = frozenset({"pong"})  # frames that expect no answer, hence carry no id


def _readable_id(obj: dict[str, Any]) -> RequestId | None:
    id_ = obj.get("id")
    if isinstance(id_, bool):
        return None
    if isinstance(id_, int) and -(2**63) <= id_ < 2**64:
        return id_
    if isinstance(id_, str) and len(id_) <= MAX_ID_CHARS and "\x00" not in id_:
        return id_
    return None


def decode(message: bytes | str, limits: FrameLimits = DEFAULT_LIMITS) -> Request:
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
        return Request(type_, id_, {})
    if type_ not in SCHEMA:
        raise FrameError(f"unknown frame type {type_[:40]!r}", id_)
    if id_ is None:
        raise FrameError(f"`{type_}` needs an `id` (an int, or a string of at most {MAX_ID_CHARS} chars)")
    required, optional = SCHEMA[type_]
    fields: dict[str, Any] = {}
    for name, check in (*required.items(), *optional.items()):
        value = obj.get(name)
        if value is None:
            if name in required and name not in obj:
                raise FrameError(f"`{type_}` needs `{name}`", id_)
            if name not in required:
                continue
        try:
            fields[name] = check(value, limits)
        except Invalid as exc:
            raise FrameError(f"`{name}` {exc}", id_) from None
    return Request(type_, id_, fields)
