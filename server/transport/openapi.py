"""The OpenAPI 3.1 document of the HTTP API, served at /openapi.json (PROTOCOL.md, HTTP API).

A plain dict, built from the edge's own limits (server/protocol/frames.py), so a limit
changed there is changed here. tests/server/transport/test_api.py checks that it
documents exactly the routes the app serves.
"""

from __future__ import annotations

from typing import Any

from events.model import Status
from server.protocol import frames as f

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _text(max_chars: int, description: str, min_chars: int = 1) -> Schema:
    return {"type": "string", "minLength": min_chars, "maxLength": max_chars, "description": description}


def _object(properties: dict[str, Schema], required: tuple[str, ...] = (), **extra: Any) -> Schema:
    # Unknown fields are ignored, as on the websocket: additionalProperties stays open.
    return {"type": "object", "properties": properties, "required": list(required), **extra}


TASK_ID = _text(f.MAX_TASK_ID_CHARS, "a task id (`tsk_...`)")
POSITION = {"type": "string", "pattern": "^[0-9a-f]{32}$", "description": "a log position"}
ANY_JSON: Schema = {"description": "any JSON value"}

SCHEMAS: dict[str, Schema] = {
    "CreateRequest": _object({
        "kind": _text(f.MAX_KIND_CHARS, "a kind the server has"),
        "scope": _text(f.MAX_SCOPE_CHARS, "e.g. `project:42`; one the token grants"),
        "input": {"type": "object", "description": "the kind's input: at most `max_input_bytes` "
                  "encoded, `max_json_depth` levels deep"},
        "labels": {"type": "array", "maxItems": f.MAX_LABELS, "items": _text(f.MAX_LABEL_CHARS, "a label")},
        "depends_on": {"type": "array", "maxItems": f.MAX_DEPENDS_ON, "items": TASK_ID},
        "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": f.MAX_TIMEOUT_S},
        "priority": {"type": "integer", "minimum": f.PRIORITY_RANGE[0], "maximum": f.PRIORITY_RANGE[1]},
    }, ("kind", "scope", "input"), description="the `create` frame's fields; `subscribe` is refused"),
    "CancelRequest": _object({"reason": _text(f.MAX_TEXT_CHARS, "why", min_chars=0)}),
    "AnswerRequest": _object({"question": _text(f.MAX_TEXT_CHARS, "the pending question's id"),
                              "answer": ANY_JSON}, ("question", "answer")),
    "Ack": _object({"task": TASK_ID, "status": _ref("Status"), "position": POSITION,
                    "duplicate": {"type": "boolean", "description": "the original ack of this "
                                  "Idempotency-Key: nothing was changed"}},
                   ("task", "status", "position", "duplicate")),
    "Status": {"type": "string", "enum": [s.value for s in Status]},
    "TaskView": _object({"id": TASK_ID, "kind": {"type": "string"}, "scope": {"type": "string"},
                         "status": _ref("Status"), "version": {"type": "integer", "minimum": 1},
                         "position": POSITION},
                        ("id", "kind", "scope", "status", "version", "position"),
                        description="PROTOCOL.md, Task view (`get`: the whole view; `list`: compact)"),
    "TaskList": _object({"tasks": {"type": "array", "items": _ref("TaskView")},
                         "cursor": {"type": ["string", "null"], "description": "the next page's"},
                         "position": POSITION}, ("tasks", "cursor", "position")),
    "Event": _object({"task": TASK_ID, "version": {"type": "integer", "minimum": 1},
                      "type": {"type": "string"}, "at": {"type": "string", "format": "date-time"},
                      "data": {"type": "object"}, "degraded": {"type": "boolean"}},
                     ("task", "version", "type", "at", "data")),
    "History": _object({"events": {"type": "array", "items": _ref("Event")},
                        "more": {"type": "boolean"}}, ("events", "more")),
    "Problem": _object({
        "type": {"type": "string", "const": "about:blank"},
        "title": {"type": "string", "description": "the status's reason phrase"},
        "status": {"type": "integer"},
        "code": {"type": "string", "enum": ["bad_request", "unauthorized", "forbidden", "not_found",
                                            "conflict", "rate_limited", "too_large", "unavailable",
                                            "internal"],
                 "description": "the protocol's error code (PROTOCOL.md, Errors)"},
        "message": {"type": "string"},
        "retryable": {"type": "boolean"},
    }, ("type", "title", "status", "code", "message", "retryable"), description="RFC 9457"),
}

_PROBLEMS = {"400": "bad_request: the message names the field",
             "401": "unauthorized: no valid token (`WWW-Authenticate: Bearer`)",
             "403": "forbidden: a scope the token does not grant",
             "404": "not_found: no such task, or one of a scope the token does not grant",
             "409": "conflict: the task's status does not allow it",
             "413": "too_large: a body over `max_frame_bytes`",
             "429": "rate_limited: over `rate_per_s` requests per second (`Retry-After`); a stream "
                    "over `max_connections_per_principal`",
             "500": "internal",
             "503": "unavailable: PostgreSQL is unreachable, nothing was written (`Retry-After`)"}


def _problems(*statuses: str) -> dict[str, Any]:
    content = {"application/problem+json": {"schema": _ref("Problem")}}
    return {s: {"description": _PROBLEMS[s], "content": content} for s in statuses}


def _json(description: str, schema: Schema) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(name: str, *, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": _ref(name)}}}


def _query(name: str, schema: Schema, description: str, *, required: bool = False,
           explode: bool | None = None) -> dict[str, Any]:
    parameter = {"name": name, "in": "query", "required": required, "schema": schema,
                 "description": description}
    if explode is not None:
        parameter["explode"] = explode
    return parameter


TASK_PATH = {"name": "id", "in": "path", "required": True, "schema": TASK_ID}
IDEMPOTENCY_KEY = {"name": "Idempotency-Key", "in": "header", "required": False,
                   "schema": _text(f.MAX_KEY_CHARS, "the command's `key`"),
                   "description": "the same key from the same principal within 24 h returns the "
                                  "original ack with `duplicate: true` and changes nothing"}
COMMON = ("400", "401", "403", "429", "500", "503")


def _command(summary: str, body: str | None, *, body_required: bool = True) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary, "parameters": [TASK_PATH, IDEMPOTENCY_KEY],
        "responses": {"200": _json("acked once durable", _ref("Ack")),
                      **_problems(*COMMON, "404", "409", "413")}}
    if body is not None:
        operation["requestBody"] = _body(body, required=body_required)
    return {"post": operation}


PATHS: dict[str, Any] = {
    "/v1/tasks": {
        "post": {"summary": "create a task", "parameters": [IDEMPOTENCY_KEY],
                 "requestBody": _body("CreateRequest"),
                 "responses": {"201": _json("created (acked once durable)", _ref("Ack")),
                               "200": _json("a duplicate of this Idempotency-Key's create", _ref("Ack")),
                               **_problems(*COMMON, "404", "413")}},
        "get": {"summary": "list the tasks the token may read (compact views)",
                "parameters": [
                    _query("scope", _text(f.MAX_SCOPE_CHARS, "a scope"), "only this scope (granted)"),
                    _query("status", {"type": "array", "items": _ref("Status")},
                           "any of these statuses: comma-separated, or repeated", explode=True),
                    _query("kind", _text(f.MAX_KIND_CHARS, "a kind"), "only this kind"),
                    _query("label", _text(f.MAX_LABEL_CHARS, "a label"), "only tasks with this label"),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": f.MAX_LIST_LIMIT,
                                     "default": 50}, "page size"),
                    _query("cursor", _text(f.MAX_CURSOR_CHARS, "a cursor"), "the previous page's cursor")],
                "responses": {"200": _json("a page of tasks", _ref("TaskList")), **_problems(*COMMON)}},
    },
    "/v1/tasks/{id}": {
        "get": {"summary": "the task's whole view", "parameters": [TASK_PATH],
                "responses": {"200": _json("the whole view", _ref("TaskView")),
                              **_problems(*COMMON, "404")}},
    },
    "/v1/tasks/{id}/events": {
        "get": {"summary": "the task's events, in version order",
                "parameters": [TASK_PATH,
                               _query("after", {"type": "integer", "minimum": 0, "maximum": f.MAX_VERSION,
                                                "default": 0}, "events after this version"),
                               _query("limit", {"type": "integer", "minimum": 1,
                                                "maximum": f.MAX_HISTORY_LIMIT,
                                                "default": f.MAX_HISTORY_LIMIT}, "at most this many")],
                "responses": {"200": _json("the events", _ref("History")), **_problems(*COMMON, "404")}},
    },
    "/v1/tasks/{id}/cancel": _command("cancel a task", "CancelRequest", body_required=False),
    "/v1/tasks/{id}/answer": _command("answer a pending question", "AnswerRequest"),
    "/v1/tasks/{id}/retry": _command("run a failed, cancelled or timed-out task again", None),
    "/v1/stream": {
        "get": {"summary": "a channel's events as server-sent events (PROTOCOL.md, Subscriptions)",
                "parameters": [
                    _query("channel", _text(f.MAX_TASK_ID_CHARS + f.MAX_SCOPE_CHARS, "a channel"),
                           "`task:<id>`, `scope:<scope>` or `all`", required=True),
                    _query("since", POSITION, "resume after this position"),
                    _query("snapshot", {"type": "boolean"}, "start with the channel's current views"),
                    _query("access_token", {"type": "string"}, "the token, for an EventSource (which "
                           "cannot send Authorization)"),
                    {"name": "Last-Event-ID", "in": "header", "required": False, "schema": POSITION,
                     "description": "sent by a reconnecting EventSource: as `since` (and wins over it)"}],
                "responses": {"200": {"description": "one event per update, `id` its position",
                                      "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                              **_problems(*COMMON, "404")}},
    },
    "/healthz": {"get": {"summary": "the process is up", "security": [],
                         "responses": {"200": _json("up", {"type": "object"})}}},
    "/readyz": {"get": {"summary": "PostgreSQL and Redis answer and relay messages arrive", "security": [],
                        "responses": {"200": _json("ready", {"type": "object"}),
                                      "503": _json("not ready", {"type": "object"})}}},
    "/openapi.json": {"get": {"summary": "this document", "security": [],
                              "responses": {"200": _json("OpenAPI 3.1", {"type": "object"})}}},
    "/metrics": {"get": {"summary": "Prometheus metrics", "security": [],
                         "responses": {"200": {"description": "the text exposition format",
                                               "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
}


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "taskcast HTTP API", "version": "1",
                 "description": "The websocket protocol's commands and queries over HTTP "
                                "(PROTOCOL.md, HTTP API): same auth, checks, limits and errors."},
        "paths": PATHS,
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "bearerFormat": "JWT"}}},
        "security": [{"bearer": []}],
    }
