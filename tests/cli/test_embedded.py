"""The embedded PostgreSQL and Valkey that `taskcast dev` and the test-suite boot (cli/embedded.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import psutil  # type: ignore[import-untyped]
import pytest
import redis

from cli.embedded import (
    EmbeddedPair,
    EmbeddedServerError,
    restart_postgres,
    restart_valkey,
    start_postgres,
    start_valkey,
    stop_postgres,
    stop_valkey,
)

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, but on a loop of its own that never becomes the thread's current loop (which
    pytest-asyncio's session loop may be)."""
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        return runner.run(coro)


async def _fetch(url: str, sql: str, *args: object) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def _execute(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def _gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def _port_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    proc = psutil.Process(pid)
    return [pid, *(child.pid for child in proc.children(recursive=True))]


def _listen_addresses(pid: int) -> set[str]:
    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def _wait_for(condition: Callable[[], T], what: str, timeout: float = 10.0) -> T:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return result


def test_pair_serves_sql_and_pubsub_on_loopback_then_stops_everything(tmp_path: Path) -> None:
    """The pair boots both servers on 127.0.0.1 only, they answer SQL and pub/sub, and leaving the
    block stops every server process and closes both ports."""
    started = time.perf_counter()
    with EmbeddedPair(tmp_path / "dev") as (database_url, redis_url):
        boot = time.perf_counter() - started
        assert database_url.startswith("postgresql://postgres@127.0.0.1:")
        assert redis_url.startswith("redis://127.0.0.1:")
        assert _run(_fetch(database_url, "SELECT 1")) == 1
        assert _run(_fetch(database_url, "SELECT current_database()")) == "taskcast"

        client = redis.Redis.from_url(redis_url)
        try:
            assert client.ping() is True
            with client.pubsub() as pubsub:  # type: ignore[no-untyped-call]
                pubsub.subscribe("embedded-test")
                _wait_for(lambda: pubsub.get_message(timeout=0.1), "the subscribe confirmation")
                assert client.publish("embedded-test", b"hello") == 1
                message = _wait_for(
                    lambda: pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1), "the message")
                assert message["data"] == b"hello"
        finally:
            client.close()

    print(f"embedded pair boot (fresh data dir): {boot:.2f}s")


def test_pair_handles_name_processes_that_are_gone_after_exit(tmp_path: Path) -> None:
    """The pair's handles name the real server PIDs and ports (loopback-bound), and after the block
    none of those processes (postmaster children included) runs and both ports refuse connections."""
    pair = EmbeddedPair(tmp_path)
    with pair:
        pg, valkey = pair.postgres, pair.valkey
        pg_tree, valkey_tree = _tree(pg.pid), _tree(valkey.pid)
        assert len(pg_tree) > 1  # a postmaster and its auxiliary processes
        assert _listen_addresses(pg.pid) == {"127.0.0.1"}
        assert _listen_addresses(valkey.pid) == {"127.0.0.1"}
    assert all(_gone(pid) for pid in pg_tree + valkey_tree)
    assert _port_closed(pg.port) and _port_closed(valkey.port)
    with pytest.raises(RuntimeError):
        _ = pair.postgres
    stop_postgres(pg)  # idempotent
    stop_valkey(valkey)


def test_postgres_restarts_on_same_port_with_its_data(tmp_path: Path) -> None:
    """A stopped PostgreSQL starts again on the same data dir and port (what fault tests do) and
    committed rows are still there."""
    pg = start_postgres(tmp_path / "pg")
    try:
        _run(_execute(pg.url, "CREATE TABLE kept (v text)", "INSERT INTO kept VALUES ('before restart')"))
        stop_postgres(pg)
        assert _gone(pg.pid) and _port_closed(pg.port)

        again = start_postgres(tmp_path / "pg", port=pg.port)
        assert again.port == pg.port and again.pid != pg.pid
        assert _run(_fetch(again.url, "SELECT v FROM kept")) == "before restart"
        again = restart_postgres(again)
        assert again.port == pg.port
        assert _run(_fetch(again.url, "SELECT count(*) FROM kept")) == 1
    finally:
        stop_postgres(pg)


def test_postgres_starts_again_after_kill_9(tmp_path: Path) -> None:
    """After kill -9 of the postmaster (stale postmaster.pid, orphaned backends) the same data dir
    and port start again, with crash recovery keeping committed rows: a second `make dev` works."""
    pg = start_postgres(tmp_path / "pg")
    try:
        _run(_execute(pg.url, "CREATE TABLE kept (v text)", "INSERT INTO kept VALUES ('committed')"))
        os.kill(pg.pid, signal.SIGKILL)
        assert (tmp_path / "pg" / "postmaster.pid").exists()

        again = start_postgres(tmp_path / "pg", port=pg.port)
        assert _run(_fetch(again.url, "SELECT v FROM kept")) == "committed"
    finally:
        stop_postgres(pg)
    assert _gone(pg.pid) and _port_closed(pg.port)


def test_start_replaces_a_server_left_running_in_the_data_dir(tmp_path: Path) -> None:
    """A server still running in the data dir (its `taskcast dev` was killed) is shut down and
    replaced on start, never run twice on the same data."""
    pg = start_postgres(tmp_path / "pg")
    valkey = start_valkey(tmp_path / "valkey")
    try:
        old_pg, old_valkey = _tree(pg.pid), _tree(valkey.pid)
        pg = start_postgres(tmp_path / "pg", port=pg.port)
        valkey = start_valkey(tmp_path / "valkey", port=valkey.port)
        assert all(_gone(pid) for pid in old_pg + old_valkey)
        assert _run(_fetch(pg.url, "SELECT 1")) == 1
        client = redis.Redis.from_url(valkey.url)
        try:
            assert client.ping() is True
        finally:
            client.close()
    finally:
        stop_valkey(valkey)
        stop_postgres(pg)


def test_valkey_keeps_keys_across_restart_only_when_persistent(tmp_path: Path) -> None:
    """Persistent Valkey keeps its keys across a stop/start on the same port; persist=False starts
    empty every time."""
    for persist in (True, False):
        valkey = start_valkey(tmp_path / f"valkey-{persist}", persist=persist)
        try:
            client = redis.Redis.from_url(valkey.url)
            try:
                client.set("k", "v")
            finally:
                client.close()
            stop_valkey(valkey)
            assert _gone(valkey.pid) and _port_closed(valkey.port)
            valkey = restart_valkey(valkey)
            client = redis.Redis.from_url(valkey.url)
            try:
                assert client.get("k") == (b"v" if persist else None)
            finally:
                client.close()
        finally:
            stop_valkey(valkey)


def test_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    """Asking for a port that something already listens on fails fast with an error naming it."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(EmbeddedServerError, match=f"port {port}"):
            start_postgres(tmp_path / "pg", port=port)
        with pytest.raises(EmbeddedServerError, match=f"port {port}"):
            start_valkey(tmp_path / "valkey", port=port)


def test_pair_stops_postgres_when_valkey_cannot_start(tmp_path: Path) -> None:
    """If Valkey fails to start, entering the pair raises and the PostgreSQL it had started is
    stopped, not leaked."""
    (tmp_path / "valkey").write_text("a file where Valkey's directory should be")
    pair = EmbeddedPair(tmp_path)
    with pytest.raises(FileExistsError), pair:
        pass
    postgres_dir = str((tmp_path / "postgres").resolve())
    leftovers = []
    for proc in psutil.process_iter():
        try:
            if proc.cwd() == postgres_dir:
                leftovers.append(proc.pid)
        except psutil.Error:
            continue
    assert leftovers == []


def test_servers_are_stopped_when_their_starter_is_killed(tmp_path: Path) -> None:
    """kill -9 of the process that started the embedded servers (as a test timeout's
    os._exit or a crash would end it) still stops them: nothing is left running."""
    import subprocess
    import sys

    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from cli.embedded import start_postgres, start_valkey\n"
        f"pg = start_postgres(Path({str(tmp_path / 'pg')!r}))\n"
        f"v = start_valkey(Path({str(tmp_path / 'v')!r}), persist=False)\n"
        "print(pg.pid, v.pid, flush=True)\n"
        "time.sleep(600)\n")
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE) as starter:
        try:
            assert starter.stdout is not None
            pids = [int(p) for p in starter.stdout.readline().split()]
            assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
        finally:
            starter.kill()
            starter.wait(10)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.05)
    assert not any(_running(p) for p in pids), pids


def _running(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
