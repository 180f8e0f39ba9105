"""The `shell` kind, over the websocket: allow-list, streamed output, cancel."""

from __future__ import annotations

from tests.conftest import Launch, ws_url
from tests.events.kinds_support import (
    all_gone,
    create,
    output_lines,
    run,
    started_steps,
    terminal_events,
    until_event,
    updates_until_end,
)
from tests.waiting import eventually
from tests.wsclient import Client


async def _client(launch: Launch, allow: str, **settings: object) -> Client:
    """A client of a server whose shell kind allows `allow` (comma-separated)."""
    shell_allow = tuple(c for c in allow.split(",") if c)
    return await Client.open(ws_url(await launch(shell_allow=shell_allow, **settings)))


async def test_shell_streams_its_output_lines_as_they_come(launch: Launch) -> None:
    """stdout and stderr lines reach watchers while the command runs, in order, batched."""
    client = await _client(launch, "echo,sh")
    script = "for i in 1 2 3; do echo line $i; sleep 0.3; done; echo oops >&2"
    view, updates = await run(client, "shell", {"command": ["sh", "-c", script]})
    assert view["status"] == "completed" and view["result"] == {"exit_code": 0, "lines": 4}
    assert output_lines(updates) == ["line 1", "line 2", "line 3", "oops"]
    batches = [u for u in updates if u["event"]["type"] == "step.output"]
    assert len(batches) > 1  # streamed while running, not all at the end
    assert view["output_tail"][-4:] == ["line 1", "line 2", "line 3", "oops"]


async def test_shell_refuses_a_command_not_allow_listed(launch: Launch) -> None:
    """Only allow-listed commands run: another fails the task before any step starts."""
    client = await _client(launch, "echo")
    view, updates = await run(client, "shell", {"command": ["sh", "-c", "echo hi"]})
    assert view["status"] == "failed" and "'sh' is not allowed" in view["error"]
    assert "echo" in view["error"] and started_steps(updates) == []
    ok, _ = await run(client, "shell", {"command": ["echo", "hi"]})
    assert ok["status"] == "completed" and ok["output_tail"] == ["hi"]


async def test_shell_without_an_allow_list_is_disabled(launch: Launch) -> None:
    """With TASKCAST_SHELL_ALLOW empty the kind refuses every command, not retryably."""
    client = await _client(launch, "")
    view, _ = await run(client, "shell", {"command": ["echo", "hi"]})
    assert view["status"] == "failed" and "disabled" in view["error"] and view["attempt"] == 1


async def test_shell_fails_on_a_nonzero_exit(launch: Launch) -> None:
    """A command that exits non-zero fails the task with its status; its output is kept."""
    client = await _client(launch, "sh")
    view, _ = await run(client, "shell", {"command": ["sh", "-c", "echo before; exit 3"]})
    assert view["status"] == "failed" and "status 3" in view["error"]
    assert view["output_tail"] == ["before"]


async def test_cancel_kills_the_whole_process_group(launch: Launch) -> None:
    """Cancel kills the command and what it spawned; the task ends cancelled, once."""
    client = await _client(launch, "sh", cancel_grace_s=0.5)
    task = await create(client, "shell", {"command": ["sh", "-c", "echo $$; sleep 60 & echo $!; wait"]})
    pids: list[int] = []

    async def both_printed() -> None:
        while len(pids) < 2:
            update = await until_event(client, task, "step.output")
            pids.extend(int(line) for line in update["event"]["data"]["lines"])

    await both_printed()
    assert not all_gone(pids)
    cancel = await client.request({"type": "cancel", "task": task})
    assert cancel["type"] == "ack"
    updates = await updates_until_end(client, task)
    assert updates[-1]["task"]["status"] == "cancelled"
    await eventually(lambda: all_gone(pids), within=5)
    assert await terminal_events(client, task) == ["task.cancelled"]


async def test_a_timeout_kills_the_command(launch: Launch) -> None:
    """A task past its timeout_s has its command killed and ends timed_out."""
    client = await _client(launch, "sh", cancel_grace_s=0.5)
    task = await create(client, "shell", {"command": ["sh", "-c", "echo $$; exec sleep 60"]}, timeout_s=1)
    update = await until_event(client, task, "step.output")
    pid = int(update["event"]["data"]["lines"][0])
    updates = await updates_until_end(client, task)
    assert updates[-1]["task"]["status"] == "timed_out"
    await eventually(lambda: all_gone([pid]), within=5)
    assert await terminal_events(client, task) == ["task.timed_out"]
