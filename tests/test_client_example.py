"""client-example/: the Python client and the bot, against real servers (and a restart)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from cli.process import Process
from tests.conftest import ws_url
from tests.restarting import Restartable
from tests.waiting import eventually, run
from tests.wsclient import Client

EXAMPLE = Path(__file__).resolve().parents[1] / "client-example"
TERMINAL = {"completed", "failed", "cancelled", "timed_out"}
SECRET = "a-client-test-secret-of-32-bytes-or-more"


def _load_client() -> ModuleType:
    spec = importlib.util.spec_from_file_location("taskcast_client", EXAMPLE / "taskcast_client.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["taskcast_client"] = module
    spec.loader.exec_module(module)
    return module


tc = _load_client()


async def _until_terminal(updates: Any, seen: list[Any], within: float = 40) -> None:
    async with asyncio.timeout(within):
        async for update in updates:
            seen.append(update)
            if update.task["status"] in TERMINAL:
                return


def test_the_client_stands_alone() -> None:
    """client-example imports nothing of taskcast's own packages."""
    for path in EXAMPLE.glob("*.py"):
        text = path.read_text()
        for package in ("server", "events"):
            assert f"from {package}" not in text and f"import {package}" not in text, path


async def test_a_restart_mid_task_yields_every_version_exactly_once(server: Restartable) -> None:
    """Killed and restarted server: the task's subscription and a scope subscription each
    resume with `since` and yield versions 1..N, none missed, none twice."""
    async with tc.TaskcastClient(server.ws_url, backoff_base_s=0.05, backoff_max_s=0.5) as client:
        scope_sub = await client.subscribe("scope:p:restart")
        ack, task_sub = await client.create_and_follow("demo", "p:restart", {"steps": 6, "step_ms": 300})
        first: list[Any] = []
        async with asyncio.timeout(20):
            async for update in task_sub:
                first.append(update)
                if update.type == "step.completed" and update.data["step"] == "step_2":
                    break
        await server.restart()
        rest: list[Any] = []
        await _until_terminal(task_sub, rest)
        assert client.reconnects >= 1
        on_scope: list[Any] = []
        await _until_terminal(scope_sub, on_scope, within=10)

        versions = [u.version for u in first + rest]
        assert rest[-1].type == "task.completed"
        assert versions == list(range(1, len(versions) + 1))
        assert [u.version for u in on_scope] == versions
        history = await client.history(ack["task"])
        assert [e["version"] for e in history["events"]] == versions


async def test_commands_and_queries(taskcast: Process) -> None:
    """create, get, list, history, cancel, retry and answer return their acks and results;
    an error frame raises TaskcastError with its code."""
    async with tc.TaskcastClient(ws_url(taskcast)) as client:
        ack = await client.create("demo", "p:q", {"steps": 50, "step_ms": 200}, labels=["x"])
        assert ack["status"] == "queued" and ack["duplicate"] is False
        again = await client.create("demo", "p:q", {}, key="same")
        assert (await client.create("demo", "p:q", {}, key="same"))["task"] == again["task"]
        assert (await client.get(ack["task"]))["labels"] == ["x"]
        page = await client.list(scope="p:q", limit=10)
        assert {t["id"] for t in page["tasks"]} == {ack["task"], again["task"]} and page["position"]
        cancelled = await client.cancel(ack["task"], "enough")
        assert cancelled["type"] == "ack"
        sub = await client.subscribe(f"task:{ack['task']}", snapshot=True)
        if sub.views[ack["task"]]["status"] not in TERMINAL:  # a queued task is cancelled at once
            await _until_terminal(sub, [])
        assert (await client.retry(ack["task"]))["status"] == "retrying"
        await client.cancel(ack["task"])
        with pytest.raises(tc.TaskcastError) as error:
            await client.answer(ack["task"], "q_1", "approve")
        assert error.value.code == "conflict"
        with pytest.raises(tc.TaskcastError) as error:
            await client.get("tsk_missing")
        assert error.value.code == "not_found"
        history = await client.history(ack["task"], after=1, limit=2)
        assert [e["version"] for e in history["events"]] == [2, 3] and history["more"] is True
        await sub.close()


async def test_a_snapshot_subscription_starts_from_current_views(taskcast: Process) -> None:
    """`snapshot: true` fills `views`; a task the snapshot showed ended yields no update again."""
    raw = await Client.open(ws_url(taskcast))
    ack = await raw.request({"type": "create", "kind": "demo", "scope": "p:snap", "input": {"steps": 0},
                             "subscribe": True})
    # Ended before the snapshot, so the snapshot holds its last version. (While a task still
    # runs, updates may be read behind the `subscribed` answer before `versions` is looked
    # at; the server's side of that race is test_a_snapshot_racing_updates_loses_none...)
    await raw.until(lambda f: f.get("type") == "update" and f["task"]["status"] in TERMINAL)
    async with tc.TaskcastClient(ws_url(taskcast)) as client:
        sub = await client.subscribe("all", snapshot=True)
        assert sub.views[ack["task"]]["status"] in TERMINAL
        second = await client.create("demo", "p:snap", {"steps": 1, "step_ms": 1})
        seen: list[Any] = []
        async with asyncio.timeout(20):
            async for update in sub:
                seen.append(update)
                if update.task_id == second["task"] and update.task["status"] in TERMINAL:
                    break
        assert not [u for u in seen if u.task_id == ack["task"]]
        assert next(u.version for u in seen if u.task_id == second["task"]) == 1
    await raw.close()


async def test_a_reader_too_slow_is_resynced_and_still_gets_every_version_once(launch: Any) -> None:
    """A subscription nobody reads for a while makes the server give up on it (`resync`, or
    close 4429); the client resumes it with `since` and still yields each version once."""
    process = await launch(send_buffer_bytes=16 * 1024, send_buffer_hard_bytes=512 * 1024)
    assert process.node is not None
    creator = await Client.open(ws_url(process))
    async with tc.TaskcastClient(ws_url(process), queue_size=1, backoff_base_s=0.05) as client:
        sub = await client.subscribe("scope:p:flood")
        # Big views (32 labels of 100 chars, repeated in every update): the buffers fill fast.
        labels = [f"{i:02d}" + "x" * 98 for i in range(32)]
        tasks = [(await creator.request({"type": "create", "kind": "demo", "scope": "p:flood",
                                         "input": {"steps": 60, "step_ms": 0}, "labels": labels}))["task"]
                 for _ in range(20)]
        await eventually(lambda: process.node.metrics.resyncs >= 1 or client.reconnects >= 1, 30)
        versions: dict[str, list[int]] = {task: [] for task in tasks}
        ended: set[str] = set()
        async with asyncio.timeout(60):
            async for update in sub:  # only now does anyone read
                versions[update.task_id].append(update.version)
                if update.task["status"] in TERMINAL:
                    ended.add(update.task_id)
                    if ended == set(tasks):
                        break
        for task, seen in versions.items():
            assert seen == list(range(1, len(seen) + 1)), task
    await creator.close()


async def test_a_refused_token_is_final(launch: Any) -> None:
    """Close 4401 at hello raises ConnectionRefused (retrying unchanged cannot help)."""
    process = await launch(secret=SECRET, workers=0)
    with pytest.raises(tc.ConnectionRefused) as refused:
        async with tc.TaskcastClient(ws_url(process)):
            pass
    assert refused.value.code == "unauthorized"


async def _run_bot(url: str, *args: str, within: float = 60) -> tuple[int, str]:
    return await run(sys.executable, str(EXAMPLE / "bot.py"), "--url", url, *args, within=within, cwd=EXAMPLE)


async def test_the_bot_answers_the_question_and_exits_0(taskcast: Process) -> None:
    """bot.py creates the task, approves its question, prints each step, exits 0."""
    code, out = await _run_bot(ws_url(taskcast), "--kind", "demo", "--scope", "p:bot",
                               "--input", json.dumps({"steps": 3, "step_ms": 50, "ask_step": 2}))
    assert code == 0, out
    for step in ("step_1", "step_2", "step_3"):
        assert out.count(f"step {step}: started") >= 1 and out.count(f"step {step}: completed") == 1, out
    assert "question q_1: Run step 2? -> approve" in out
    assert out.rstrip().endswith('task completed: {"steps": 3}'), out


async def test_the_bot_exits_1_when_its_task_fails(taskcast: Process) -> None:
    """A denied question fails the task: the bot says so and exits 1."""
    code, out = await _run_bot(ws_url(taskcast), "--kind", "demo", "--answer", "deny",
                               "--input", json.dumps({"steps": 2, "step_ms": 10, "ask_step": 1}))
    assert code == 1, out
    assert "task failed: step 1 was denied" in out, out
