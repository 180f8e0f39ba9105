"""Nothing one client sends can hurt anyone else (invariant 9), against live `serve`,
`relay` and `worker` processes: hostile frames of every type are refused at the edge, and
every process stays up and keeps serving everybody."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from server.settings import Settings
from tests.spawn import process_env, taskcast
from tests.waiting import eventually_async, free_port
from tests.wsclient import Client

ERROR_CODES = {"bad_request", "unauthorized", "forbidden", "not_found", "conflict", "rate_limited"}
CLOSE_CODES = {1000, 1009, 4401, 4403, 4429}


@dataclass
class Live:
    url: str
    port: int
    procs: dict[str, subprocess.Popen[bytes]]
    logs: dict[str, Path]

    def check(self) -> None:
        """Every process is alive and none logged a traceback."""
        for name, proc in self.procs.items():
            assert proc.poll() is None, f"{name} exited with {proc.returncode}: {self.logs[name].read_text()}"
        for name, log in self.logs.items():
            text = log.read_text(errors="replace")
            assert "Traceback" not in text, f"{name} logged a traceback:\n{text[-4000:]}"


async def _http_status(port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    async with asyncio.timeout(5):
        head = await reader.readline()
    writer.close()
    return int(head.split()[1])


@pytest.fixture
async def live(settings: Settings, tmp_path: Path) -> AsyncIterator[Live]:
    """`taskcast serve`, `relay` and `worker` as separate processes, logs in tmp_path."""
    port = free_port()
    env = process_env(settings, TASKCAST_WORKSPACE_ROOT=settings.workspace_root, TASKCAST_LOG="INFO",
                      TASKCAST_LEASE_S="5")
    commands = {"serve": ["serve", "--port", str(port)], "relay": ["relay"],
                "worker": ["worker", "--concurrency", "8"]}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {}
    try:
        for name, args in commands.items():
            logs[name] = tmp_path / f"{name}.log"
            with logs[name].open("wb") as out:
                procs[name] = taskcast(settings, *args, env=env, stdout=out, stderr=subprocess.STDOUT)

        async def ready() -> bool:
            try:
                return await _http_status(port, "/readyz") == 200
            except OSError:
                return False

        await eventually_async(ready, within=30, poll_s=0.1)
        yield Live(f"ws://127.0.0.1:{port}/ws", port, procs, logs)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(10)


async def _completes(url: str) -> None:
    """A fresh client creates a task and sees it complete."""
    client = await Client.open(url)
    try:
        ack = await client.request({"type": "create", "kind": "demo", "scope": "p:fresh",
                                    "input": {"steps": 1, "step_ms": 0}, "subscribe": True})
        assert ack["type"] == "ack", ack
        await client.until(lambda f: f["type"] == "update" and f["event"]["type"] == "task.completed",
                           within=20)
    finally:
        await client.close()


def _nested(depth: int) -> Any:
    value: Any = 1
    for i in range(depth):
        value = {"a": value} if i % 2 else [value]
    return value


strings = st.sampled_from(["", "\x00", "a\x00b", "tsk_\x00", "x" * 5000, "*", "../../etc", "\n",
                           "project:1", "scope:p", "task:tsk_x", "all", "\u202e", "demo"]) \
    | st.text(max_size=12)
numbers = st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63) - 1, 2**64 - 1, 1e300, -1e300, 1.5, -0.0,
                           86400 * 31]) | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
positions = st.sampled_from(["f" * 32, "0" * 32, "-" + "0" * 31, "0_" * 16, "g" * 32, "0" * 33,
                             "7" + "f" * 31, "0" * 31 + "\x00", "8" + "0" * 31])
deep = st.sampled_from([40, 250, 600]).map(_nested)
scalars = st.none() | st.booleans() | strings | numbers
hostile = st.one_of(scalars, positions, deep, st.lists(scalars, max_size=4),
                    st.dictionaries(strings, scalars, max_size=3))
ids = st.sampled_from([1, "id", -1, 2**70, True, None, "x" * 70, "i\x00"])


def _frame(type_: str, **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[str]:
    optional = {name: strategy | hostile for name, strategy in fields.items()}
    return st.fixed_dictionaries({"type": st.just(type_), "id": ids}, optional=optional).map(json.dumps)


# Small, valid demo inputs sometimes, so that real tasks run too (never long ones).
demo_input = st.fixed_dictionaries({}, optional={
    "steps": st.integers(0, 2), "step_ms": st.integers(0, 5), "fail_step": st.integers(0, 2),
    "ask_step": st.integers(0, 2)})
frames = st.one_of(
    _frame("hello", token=strings, client=strings),
    _frame("ping"),
    _frame("refresh", token=strings),
    _frame("create", kind=st.sampled_from(["demo", "nope"]), scope=st.sampled_from(["p:fuzz", "p\x00"]),
           input=demo_input | deep, labels=st.lists(strings, max_size=40),
           depends_on=st.lists(strings, max_size=3),
           timeout_s=numbers, priority=numbers, subscribe=st.booleans(), key=strings),
    _frame("cancel", task=strings, reason=strings, key=strings),
    _frame("answer", task=strings, question=strings, answer=hostile, key=strings),
    _frame("retry", task=strings, key=strings),
    _frame("get", task=strings),
    _frame("list", scope=strings, status=st.lists(strings, max_size=3), kind=strings, label=strings,
           limit=numbers, cursor=strings),
    _frame("history", task=strings, after=numbers, limit=numbers),
    _frame("subscribe", channel=strings, since=positions, snapshot=st.booleans()),
    _frame("unsubscribe", channel=strings),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(frames, min_size=1, max_size=12))
async def test_hostile_frames_of_every_type_hurt_nobody(live: Live, batch: list[str]) -> None:
    """Hostile values in every field of every frame type: only `bad_request` (or another
    documented refusal) and documented close codes, never `internal`; no process logs a
    traceback or exits; afterwards a fresh client's task runs to completion."""
    try:
        async with connect(live.url, compression=None, max_size=None) as ws:
            await ws.send('{"type":"hello","id":"h"}')
            await asyncio.wait_for(ws.recv(), 10)
            for frame in batch:
                await ws.send(frame)
            await ws.send('{"type":"ping","id":"last"}')
            async with asyncio.timeout(15):
                while True:
                    answer = json.loads(await ws.recv())
                    if answer["type"] == "error":
                        assert answer["code"] in ERROR_CODES, (answer, batch)
                    if answer == {"type": "pong", "id": "last"}:
                        break
    except ConnectionClosed as closed:
        assert closed.rcvd is not None and closed.rcvd.code in CLOSE_CODES, batch
    live.check()
    await _completes(live.url)
    live.check()


async def test_a_huge_timeout_is_refused_and_kills_no_worker(live: Live) -> None:
    """`timeout_s: 1e300` (which once crashed every worker) is `bad_request` naming the
    field; the workers live on and run the next task."""
    client = await Client.open(live.url)
    answer = await client.request({"type": "create", "kind": "demo", "scope": "p:t",
                                   "input": {"steps": 1}, "timeout_s": 1e300})
    assert answer["code"] == "bad_request" and "`timeout_s`" in answer["message"]
    await _completes(live.url)
    live.check()
