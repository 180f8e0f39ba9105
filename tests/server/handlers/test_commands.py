"""Commands: what a principal's grant lets through, as it is when the command writes."""

from __future__ import annotations

from server.protocol.auth import mint
from tests.conftest import Launch, ws_url
from tests.server.handlers.racing import answers, in_one_write, parked
from tests.wsclient import Client

SECRET = "a-secret-for-tests-that-is-32-bytes-long"
NARROW = ["project:1"]


async def test_a_refresh_racing_a_create_refuses_the_scope_it_no_longer_grants(launch: Launch) -> None:
    """A `create` in project:2 with a `refresh` dropping project:2 right behind it (read
    while the create awaits its dependencies' scopes) is `forbidden`, and no task is written."""
    process = await launch(secret=SECRET, workers=0)
    admin = await Client.open(ws_url(process), token=mint(SECRET, "admin", ["*"]))
    dep = await admin.request({"type": "create", "kind": "demo", "scope": "project:1",
                               "input": {"steps": 1, "step_ms": 0}})
    user = await Client.open(ws_url(process), token=mint(SECRET, "u", ["project:1", "project:2"]))
    in_one_write(user, {"type": "create", "id": "c", "kind": "demo", "scope": "project:2",
                        "input": {"steps": 1, "step_ms": 0}, "depends_on": [dep["task"]]},
                 {"type": "refresh", "id": "r", "token": mint(SECRET, "u", NARROW)})
    answered = await answers(user, "c", "r")
    assert answered["r"]["type"] == "result", answered["r"]
    assert (answered["c"]["type"], answered["c"].get("code")) == ("error", "forbidden"), answered["c"]
    listed = await admin.request({"type": "list", "scope": "project:2"})
    assert listed["data"]["tasks"] == []


async def test_a_refresh_racing_a_cancel_answers_as_for_a_missing_task(launch: Launch) -> None:
    """A `cancel` of a project:2 task with a `refresh` dropping project:2 right behind it
    (read while the cancel reads the task) answers `not_found` and leaves the task alone."""
    process = await launch(secret=SECRET)
    admin, task = await parked(ws_url(process), mint(SECRET, "admin", ["*"]), "project:2")
    user = await Client.open(ws_url(process), token=mint(SECRET, "u", ["project:1", "project:2"]))
    in_one_write(user, {"type": "cancel", "id": "c", "task": task},
                 {"type": "refresh", "id": "r", "token": mint(SECRET, "u", NARROW)})
    answered = await answers(user, "c", "r")
    assert answered["r"]["type"] == "result", answered["r"]
    assert (answered["c"]["type"], answered["c"].get("code")) == ("error", "not_found"), answered["c"]
    view = (await admin.request({"type": "get", "task": task}))["data"]
    assert view["status"] == "waiting_answer" and not view.get("cancel_requested"), view
