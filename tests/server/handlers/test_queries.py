"""Queries: what a principal's grant lets it read, as it is when the answer is made."""

from __future__ import annotations

from typing import Any

import pytest

from server.protocol.auth import mint
from tests.conftest import Launch, ws_url
from tests.server.handlers.racing import answers, in_one_write
from tests.wsclient import Client

SECRET = "a-secret-for-tests-that-is-32-bytes-long"


@pytest.mark.parametrize(("query", "code"), [
    ({"type": "get"}, "not_found"),
    ({"type": "history"}, "not_found"),
    ({"type": "list", "scope": "project:2"}, "forbidden"),
    ({"type": "list"}, None),
])
async def test_a_refresh_racing_a_query_never_answers_what_it_no_longer_grants(
        launch: Launch, query: dict[str, Any], code: str | None) -> None:
    """A query with a `refresh` dropping project:2 right behind it (read while the query
    awaits the database) answers as for the narrowed token: a task of project:2 is
    `not_found`, naming the scope is `forbidden`, and no view of it is listed."""
    process = await launch(secret=SECRET, workers=0)
    admin = await Client.open(ws_url(process), token=mint(SECRET, "admin", ["*"]))
    hidden = await admin.request({"type": "create", "kind": "demo", "scope": "project:2",
                                  "input": {"steps": 1, "step_ms": 0}})
    user = await Client.open(ws_url(process), token=mint(SECRET, "u", ["project:1", "project:2"]))
    frame = {**query, "id": "q"} if query["type"] == "list" else {**query, "id": "q",
                                                                   "task": hidden["task"]}
    in_one_write(user, frame, {"type": "refresh", "id": "r", "token": mint(SECRET, "u", ["project:1"])})
    answered = await answers(user, "q", "r")
    assert answered["r"]["type"] == "result", answered["r"]
    if code is not None:
        assert (answered["q"]["type"], answered["q"].get("code")) == ("error", code), answered["q"]
    else:
        assert answered["q"]["type"] == "result" and answered["q"]["data"]["tasks"] == [], answered["q"]
