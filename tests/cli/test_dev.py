"""`taskcast dev` as a new user runs it: embedded PostgreSQL and Valkey, nothing else set."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.waiting import eventually, free_port, listening
from tests.wsclient import Client


def _spawn_dev(data_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "cli.main", "dev", "--port", str(port),
                                 "--data-dir", str(data_dir)], env=env, stdout=out, stderr=subprocess.STDOUT)


async def _run_dev(data_dir: Path, port: int) -> tuple[subprocess.Popen[bytes], Path]:
    log = data_dir.parent / f"dev-{port}.log"
    proc = _spawn_dev(data_dir, port, log)
    await eventually(lambda: b"taskcast is running" in log.read_bytes() or proc.poll() is not None, 60)
    assert proc.poll() is None, log.read_text()
    return proc, log


async def _stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    """Ctrl-C, and the process exits 0 in time (else: its tasks are dumped, then it is killed)."""
    proc.send_signal(signal.SIGINT)
    try:
        await eventually(lambda: proc.poll() is not None, 20)
    except TimeoutError:
        proc.send_signal(signal.SIGUSR1)
        with contextlib.suppress(TimeoutError):  # its tasks dumped to the log, then killed
            await eventually(lambda: "task " in log.read_text(), 2)
        proc.kill()
        proc.wait()
        raise AssertionError("taskcast dev did not stop:\n" + log.read_text()[-8000:]) from None
    assert proc.returncode == 0, log.read_text()


async def test_taskcast_dev_runs_a_task_end_to_end_and_stops_cleanly(tmp_path: Path) -> None:
    """A demo task's steps stream within a second of create; Ctrl-C stops the embedded servers;
    the data is still there on the next `taskcast dev`."""
    data_dir, port = tmp_path / ".taskcast", free_port()
    proc, log = await _run_dev(data_dir, port)
    try:
        assert f"http://127.0.0.1:{port}/" in log.read_text()
        client = await Client.open(f"ws://127.0.0.1:{port}/ws")
        loop = asyncio.get_running_loop()
        started = loop.time()
        ack = await client.request({"type": "create", "kind": "demo", "scope": "project:1",
                                    "input": {"steps": 3, "step_ms": 50}, "subscribe": True})
        first_step = await client.until(lambda f: f["type"] == "update"
                                        and f["event"]["type"] == "step.started")
        assert loop.time() - started < 1.0
        assert first_step["event"]["task"] == ack["task"]
        await client.until(lambda f: f["type"] == "update" and f["event"]["type"] == "task.completed")
        await client.close()
    finally:
        await _stop(proc, log)
    assert not listening(port)
    pg_pid = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0]) \
        if (data_dir / "postgres" / "postmaster.pid").exists() else None
    assert pg_pid is None  # PostgreSQL shut down and removed its pid file

    proc, log = await _run_dev(data_dir, port)
    try:
        client = await Client.open(f"ws://127.0.0.1:{port}/ws")
        view = await client.request({"type": "get", "task": ack["task"]})
        assert view["data"]["status"] == "completed"
        await client.close()
    finally:
        await _stop(proc, log)
