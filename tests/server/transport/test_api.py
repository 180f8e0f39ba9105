"""The HTTP API (PROTOCOL.md, HTTP API): the websocket's commands and queries, with the same
auth, checks, limits and errors, over real HTTP/1.1 to a live taskcast process."""

from __future__ import annotations

import asyncio
import http.client
import math
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.routing import Route

from cli.process import Process
from events import errors
from server.protocol.auth import mint
from server.transport.http import STATUS, problem
from server.transport.openapi import document
from tests.conftest import Launch, ws_url
from tests.server.handlers.racing import parked
from tests.waiting import eventually_async
from tests.wsclient import Client

SECRET = "a-secret-for-tests-that-is-32-bytes-long"
ADMIN = mint(SECRET, "admin", ["*"])
DEMO = {"kind": "demo", "scope": "project:1", "input": {"steps": 1, "step_ms": 0}}
DEADLINE_S = 10.0


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


async def call(process: Process, method: str, path: str, *, body: Any = None, raw: bytes | None = None,
               token: str | None = None, key: str | None = None,
               headers: dict[str, str] | None = None) -> Reply:
    """One request to the process's listener, on a connection of its own."""
    content = raw if raw is not None else None if body is None else orjson.dumps(body)
    sent = dict(headers or {})
    if token is not None:
        sent["authorization"] = f"Bearer {token}"
    if key is not None:
        sent["idempotency-key"] = key
    if content is not None:
        sent["content-type"] = "application/json"
    return await asyncio.to_thread(_request, process.settings.port, method, path, content, sent)


def _request(port: int, method: str, path: str, content: bytes | None, headers: dict[str, str]) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
    try:
        conn.request(method, path, body=content, headers=headers)
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


def assert_problem(reply: Reply, code: str, *, naming: str | None = None) -> dict[str, Any]:
    """`reply` is the problem body of `code` (whose message names `naming`)."""
    assert reply.status == STATUS[code], (reply.status, reply.body)
    assert reply.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = reply.json
    assert body["code"] == code and body["status"] == reply.status and body["type"] == "about:blank", body
    assert isinstance(body["title"], str) and isinstance(body["retryable"], bool), body
    if naming is not None:
        assert f"`{naming}`" in body["message"], body
    return body


async def test_a_create_repeated_with_its_idempotency_key_returns_the_one_task(launch: Launch) -> None:
    """The second create with the same Idempotency-Key is 200 `duplicate` with the first's ack."""
    process = await launch(secret=SECRET, workers=0)
    first = await call(process, "POST", "/v1/tasks", body=DEMO, token=ADMIN, key="k-1")
    assert first.status == 201, first.body
    assert first.headers["location"] == f"/v1/tasks/{first.json['task']}"
    assert set(first.json) == {"task", "status", "position", "duplicate"} and not first.json["duplicate"]
    again = await call(process, "POST", "/v1/tasks", body=DEMO, token=ADMIN, key="k-1")
    assert again.status == 200, again.body
    assert again.json == {**first.json, "duplicate": True}
    listed = await call(process, "GET", "/v1/tasks?scope=project:1", token=ADMIN)
    assert [t["id"] for t in listed.json["tasks"]] == [first.json["task"]]


async def test_an_idempotency_key_is_the_socket_key_of_the_same_principal(launch: Launch) -> None:
    """A create over HTTP with the key of the principal's earlier socket create is that create."""
    process = await launch(secret=SECRET, workers=0)
    client = await Client.open(ws_url(process), token=ADMIN)
    ack = await client.request({"type": "create", **DEMO, "key": "shared"})
    again = await call(process, "POST", "/v1/tasks", body=DEMO, token=ADMIN, key="shared")
    assert again.status == 200 and again.json["task"] == ack["task"] and again.json["duplicate"]
    other = await call(process, "POST", "/v1/tasks", body=DEMO, token=mint(SECRET, "u", ["*"]), key="shared")
    assert other.status == 201 and other.json["task"] != ack["task"]
    await client.close()


async def test_bad_requests_name_the_field_exactly_as_the_websocket_does(launch: Launch) -> None:
    """Every refused field, query int, token or body is 400 naming it, as the websocket says."""
    process = await launch(workers=0)
    client = await Client.open(ws_url(process))
    for fields, name in (({**DEMO, "input": [1]}, "input"), ({**DEMO, "timeout_s": 0}, "timeout_s"),
                         ({**DEMO, "input": {"steps": "x"}}, "input.steps"),
                         ({**DEMO, "labels": ["a\x00"]}, "labels"), ({"scope": "p", "input": {}}, "kind")):
        reply = await call(process, "POST", "/v1/tasks", body=fields)
        frame = await client.request({"type": "create", **fields})
        assert assert_problem(reply, "bad_request", naming=name)["message"] == frame["message"]
    deep = b'{"kind":"demo","scope":"p","input":' + b'{"a":' * 300 + b"1" + b"}" * 301
    assert_problem(await call(process, "POST", "/v1/tasks", raw=deep), "bad_request", naming="input")
    for path, name in (("/v1/tasks?limit=abc", "limit"), ("/v1/tasks?limit=+5", "limit"),
                       ("/v1/tasks?limit=501", "limit"), ("/v1/tasks?status=running,nope", "status"),
                       ("/v1/tasks?kind=a&kind=b", "kind"), ("/v1/tasks/tsk_x/events?after=1.5", "after"),
                       ("/v1/tasks?limit=%EF%BC%91", "limit"), ("/v1/tasks/" + "x" * 65, "task"),
                       ("/v1/tasks/tsk%00x", "task"), ("/v1/tasks/tsk%0Ax/events", "task")):
        assert_problem(await call(process, "GET", path), "bad_request", naming=name)
    assert_problem(await call(process, "GET", "/v1/tasks", token="x" * 8193), "bad_request", naming="token")
    for raw in (b"[1]", b"not json", b'"create"', b'{"kind": "\xff"}'):
        assert_problem(await call(process, "POST", "/v1/tasks", raw=raw), "bad_request")
    assert_problem(await call(process, "POST", "/v1/tasks", body={**DEMO, "subscribe": True}),
                   "bad_request", naming="subscribe")
    assert_problem(await call(process, "POST", "/v1/tasks", body=DEMO, key=""), "bad_request", naming="key")
    await client.close()


async def test_a_missing_or_bad_token_is_unauthorized_with_www_authenticate(launch: Launch) -> None:
    """No token, a token of another secret, an expired one, another scheme: 401, `Bearer`."""
    process = await launch(secret=SECRET, workers=0, relay=False)
    other = mint("another-secret-of-32-bytes-or-more-than-that", "x", ["*"])
    expired = mint(SECRET, "x", ["*"], ttl_s=-60)
    for headers in ({}, {"authorization": f"Bearer {other}"}, {"authorization": f"Bearer {expired}"},
                    {"authorization": f"Basic {ADMIN}"}, {"authorization": "Bearer"},
                    {"authorization": "Bearer \xe4.\xff.x"}):
        reply = await call(process, "GET", "/v1/tasks", headers=headers)
        assert_problem(reply, "unauthorized")
        assert reply.headers["www-authenticate"] == "Bearer"


async def test_a_scope_not_granted_is_forbidden(launch: Launch) -> None:
    """Creating in, or listing, a scope the token does not grant, or a token with no scope: 403."""
    process = await launch(secret=SECRET, workers=0, relay=False)
    user = mint(SECRET, "u", ["project:1"])
    assert_problem(await call(process, "POST", "/v1/tasks", body={**DEMO, "scope": "project:2"}, token=user),
                   "forbidden")
    assert_problem(await call(process, "GET", "/v1/tasks?scope=project:2", token=user), "forbidden")
    assert_problem(await call(process, "GET", "/v1/tasks", token=mint(SECRET, "none", [])), "forbidden")


async def test_a_task_of_a_scope_not_granted_is_not_found_exactly_as_a_missing_one(launch: Launch) -> None:
    """Another scope's task is 404 as a missing one on every route; a list shows only granted scopes."""
    process = await launch(secret=SECRET, workers=0)
    mine = (await call(process, "POST", "/v1/tasks", body=DEMO, token=ADMIN)).json["task"]
    theirs = (await call(process, "POST", "/v1/tasks", body={**DEMO, "scope": "project:2"},
                         token=ADMIN)).json["task"]
    user = mint(SECRET, "u", ["project:1"])
    for task in (theirs, "tsk_missing"):
        answers = [await call(process, "GET", f"/v1/tasks/{task}", token=user),
                   await call(process, "GET", f"/v1/tasks/{task}/events", token=user),
                   await call(process, "POST", f"/v1/tasks/{task}/cancel", token=user),
                   await call(process, "POST", f"/v1/tasks/{task}/retry", token=user),
                   await call(process, "POST", f"/v1/tasks/{task}/answer", token=user,
                              body={"question": "q_1", "answer": "approve"})]
        for reply in answers:
            assert assert_problem(reply, "not_found")["message"] == f"no task {task}"
    listed = await call(process, "GET", "/v1/tasks", token=user)
    assert [t["id"] for t in listed.json["tasks"]] == [mine]
    view = await call(process, "GET", f"/v1/tasks/{theirs}", token=ADMIN)
    assert view.json["status"] == "queued"


async def test_commands_the_task_is_not_in_a_state_for_are_conflict(launch: Launch) -> None:
    """An answer to a task not waiting for one, a retry of a task not ended: 409."""
    process = await launch(workers=0)
    task = (await call(process, "POST", "/v1/tasks", body=DEMO)).json["task"]
    assert_problem(await call(process, "POST", f"/v1/tasks/{task}/answer",
                              body={"question": "q_1", "answer": "approve"}), "conflict")
    assert_problem(await call(process, "POST", f"/v1/tasks/{task}/retry"), "conflict")
    cancelled = await call(process, "POST", f"/v1/tasks/{task}/cancel", body={"reason": "done"}, key="c")
    assert cancelled.status == 200 and cancelled.json["status"] == "cancelled", cancelled.body
    assert_problem(await call(process, "POST", f"/v1/tasks/{task}/cancel"), "conflict")
    again = await call(process, "POST", f"/v1/tasks/{task}/cancel", key="c")
    assert again.json == {**cancelled.json, "duplicate": True}
    retried = await call(process, "POST", f"/v1/tasks/{task}/retry")
    assert retried.status == 200 and retried.json["status"] == "retrying", retried.body


async def test_an_answer_over_http_resumes_the_parked_task(launch: Launch) -> None:
    """A task waiting on its question takes the answer over HTTP and completes."""
    process = await launch()
    client, task = await parked(ws_url(process), "", "project:1")
    view = (await call(process, "GET", f"/v1/tasks/{task}")).json
    (question,) = view["questions"]
    acked = await call(process, "POST", f"/v1/tasks/{task}/answer", key="a",
                       body={"question": question["id"], "answer": "approve"})
    assert acked.status == 200 and not acked.json["duplicate"], acked.body
    await client.until(lambda f: f["type"] == "update" and f["event"]["type"] == "task.completed")
    await client.close()


async def test_a_body_over_max_frame_bytes_is_too_large(launch: Launch) -> None:
    """A body one byte over `max_frame_bytes` is 413; one at it is read (and checked)."""
    process = await launch(workers=0, relay=False, max_frame_bytes=1024)
    within = orjson.dumps(DEMO)
    padded = within[:-1] + b" " * (1024 - len(within)) + b"}"
    assert len(padded) == 1024
    assert (await call(process, "POST", "/v1/tasks", raw=padded)).status == 201
    assert_problem(await call(process, "POST", "/v1/tasks", raw=b" " + padded), "too_large")


async def test_requests_over_rate_per_s_of_a_principal_are_rate_limited(launch: Launch) -> None:
    """Past `rate_per_s` a principal is 429 with Retry-After, while another principal is not."""
    process = await launch(secret=SECRET, workers=0, relay=False, rate_per_s=3)
    limited: list[Reply] = []

    async def limited_now() -> bool:
        reply = await call(process, "GET", "/v1/tasks", token=ADMIN)
        if reply.status == 429:
            limited.append(reply)
        return bool(limited)

    await eventually_async(limited_now, within=DEADLINE_S, poll_s=0)
    assert assert_problem(limited[0], "rate_limited")["retryable"] is True
    assert limited[0].headers["retry-after"] == "1"
    other = await call(process, "GET", "/v1/tasks", token=mint(SECRET, "other", ["*"]))
    assert other.status == 200, other.body


async def test_an_unexpected_failure_is_internal_and_leaks_nothing(launch: Launch) -> None:
    """A handler's own bug is 500 `internal` whose message says nothing of it."""
    process = await launch(workers=0, relay=False)
    assert process.node is not None

    async def broken(*_: object) -> None:
        raise RuntimeError("a secret detail")

    process.node.services.handlers["get"] = broken
    body = assert_problem(await call(process, "GET", "/v1/tasks/tsk_1"), "internal")
    assert body["message"] == "internal error"


def test_every_error_code_has_its_status_and_headers() -> None:
    """Each error code maps to its status; 401 says Bearer; the retryable ones say Retry-After."""
    codes = {cls.code for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.TaskcastError)}
    assert codes == set(STATUS)
    for cls in (errors.Unavailable, errors.RateLimited, errors.Unauthorized, errors.VersionConflict):
        reply = problem(cls("m"))
        assert reply.status_code == STATUS[cls.code]
        assert ("retry-after" in reply.headers) == cls.retryable
        assert ("www-authenticate" in reply.headers) == (cls is errors.Unauthorized)


async def test_get_list_and_history_equal_the_websocket_answers(launch: Launch) -> None:
    """For the same ended task, GET, list and events answer the websocket's result data."""
    process = await launch(secret=SECRET)
    client = await Client.open(ws_url(process), token=ADMIN)
    ack = await client.request({"type": "create", **DEMO, "labels": ["l"], "subscribe": True})
    await client.until(lambda f: f["type"] == "update" and f["event"]["type"] == "task.completed")
    task = ack["task"]
    pairs = ((f"/v1/tasks/{task}", {"type": "get", "task": task}),
             ("/v1/tasks?scope=project:1&status=completed,failed&kind=demo&label=l&limit=5",
              {"type": "list", "scope": "project:1", "status": ["completed", "failed"], "kind": "demo",
               "label": "l", "limit": 5}),
             ("/v1/tasks?status=completed&status=failed",
              {"type": "list", "status": ["completed", "failed"]}),
             (f"/v1/tasks/{task}/events?after=1&limit=3", {"type": "history", "task": task, "after": 1,
                                                          "limit": 3}))
    for path, frame in pairs:
        reply = await call(process, "GET", path, token=ADMIN)
        answer = await client.request(frame)
        assert reply.status == 200, reply.body
        assert reply.json == answer["data"], path
    await client.close()


def _documented(doc: dict[str, Any]) -> dict[str, set[str]]:
    return {path: {m.upper() for m in ops} for path, ops in doc["paths"].items()}


async def test_the_openapi_document_matches_the_routes_served(launch: Launch) -> None:
    """Each /v1, health and metrics route is documented, each documented path served, each $ref resolves."""
    process = await launch(workers=0, relay=False)
    served_doc = await call(process, "GET", "/openapi.json")
    assert served_doc.status == 200 and served_doc.json == orjson.loads(orjson.dumps(document()))
    doc = served_doc.json
    assert doc["openapi"].startswith("3.1")
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert process.node is not None and process.node.services.http is not None
    served: dict[str, set[str]] = {}
    for route in process.node.services.http.app.routes:
        if isinstance(route, Route):
            served.setdefault(route.path, set()).update((route.methods or set()) - {"HEAD"})
    documented = _documented(doc)
    for path, methods in served.items():
        if path.startswith("/v1/") or path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
            assert documented.get(path) == methods, path
    assert set(documented) <= set(served), set(documented) - set(served)
    refs = [v for v in _walk(doc) if isinstance(v, str) and v.startswith("#/")]
    for ref in refs:
        node: Any = doc
        for part in ref[2:].split("/"):
            node = node[part]
    assert refs and not any(isinstance(v, float) and not math.isfinite(v) for v in _walk(doc))


def _walk(value: Any) -> list[Any]:
    """Every value nested in `value` (dict values, list items, and leaves)."""
    found = [value]
    if isinstance(value, dict):
        found += [x for v in value.values() for x in _walk(v)]
    elif isinstance(value, list):
        found += [x for v in value for x in _walk(v)]
    return found
