"""Test harness: real PostgreSQL and Redis, a fresh database per test.

The servers are named by TASKCAST_TEST_DATABASE_URL and TASKCAST_TEST_REDIS_URL (CI sets
them to the machine's); without them the embedded pair is booted once for the session.
Each test gets its own database, cloned from a migrated template, and its own Redis
channel, so tests never see each other's events.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import uvloop
from hypothesis import settings as hypothesis_settings

from cli.embedded import EmbeddedPostgres, EmbeddedServerError, start_postgres, stop_postgres
from cli.embedded.cluster import EmbeddedCluster, start_cluster, stop_cluster
from cli.embedded.valkey import valkey_cli
from cli.process import Process, Roles
from events import db
from events.aio import where
from events.log import EventLog
from events.migrate import migrate
from server.settings import Settings
from tests.restarting import Restartable

Launch = Callable[..., Awaitable[Process]]  # the `launch` fixture: start a Process, changed settings

_counter = itertools.count()

# No per-example deadline for the property tests: on a shared machine one example's wall
# time says nothing of the code (a 200 ms deadline failed a frame fuzz test under load).
hypothesis_settings.register_profile("taskcast", deadline=None)
hypothesis_settings.load_profile("taskcast")


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, object]:
    """Tests run on uvloop, as taskcast does (its transports differ from asyncio's)."""
    return {"uvloop": uvloop.new_event_loop}


LEFTOVER_GRACE_S = 2.0  # for a task the test's fixtures cancelled to finish ending


@pytest.fixture(autouse=True)
async def no_stray_loop_errors() -> AsyncIterator[None]:
    """Fail a test that left an unhandled error in the event loop (a task's exception
    nobody retrieved, a callback that raised), as asyncpg's own harness does, or a task
    still running after its fixtures stopped (it would fail a later test when it is
    garbage-collected: "Task was destroyed but it is pending"). Torn down after the
    test's other fixtures, so what they stop is stopped by then."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    before = asyncio.all_tasks()
    gc.collect()  # what earlier tests left is reported now, not during this test
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        yield
        left = asyncio.all_tasks() - before - {asyncio.current_task()}
        if left:
            await asyncio.wait(left, timeout=LEFTOVER_GRACE_S)
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
    problems = [_describe(c) for c in errors]
    problems += [f"a task left running: {t.get_name()} at {where(t)}" for t in left if not t.done()]
    for task in left:
        if not task.done():
            task.cancel()  # not a later test's problem
    if problems:
        pytest.fail("unhandled errors in the event loop:\n" + "\n".join(problems), pytrace=False)


def _describe(context: dict[str, Any]) -> str:
    """One loop error, naming the task, future or callback it came from."""
    source = context.get("task") or context.get("future") or context.get("handle")
    text = f"{context.get('message')}: {context.get('exception')!r}"
    if isinstance(source, asyncio.Task):
        text += f" (task {source.get_name()}: {source.get_coro()!r} at {where(source)})"
    elif source is not None:
        text += f" ({source!r})"
    return text


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def servers() -> Iterator[tuple[str, str]]:
    """(database url, redis url) of the servers the suite runs against."""
    database_url = os.environ.get("TASKCAST_TEST_DATABASE_URL")
    redis_url = os.environ.get("TASKCAST_TEST_REDIS_URL")
    if database_url and redis_url:
        yield database_url, redis_url
        return
    from cli.embedded import EmbeddedPair

    with tempfile.TemporaryDirectory(prefix="taskcast-test-") as root, EmbeddedPair(Path(root)) as pair:
        yield database_url or pair[0], redis_url or pair[1]


@pytest.fixture(scope="session")
async def template(servers: tuple[str, str]) -> AsyncIterator[str]:
    """A migrated template database; its name."""
    admin = servers[0]
    name = f"taskcast_tpl_{os.getpid()}"
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
        await migrate(_with_database(admin, name))
        yield name
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def database_url(servers: tuple[str, str], template: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test."""
    admin = servers[0]
    name = f"taskcast_t_{os.getpid()}_{next(_counter)}"
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        yield _with_database(admin, name)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def own_postgres(tmp_path: Path) -> AsyncIterator[EmbeddedPostgres]:
    """A migrated PostgreSQL of this test's own, which it may stop and start."""
    pg = await asyncio.to_thread(start_postgres, tmp_path / "pg")
    try:
        await migrate(pg.url)
        yield pg
    finally:
        await asyncio.to_thread(stop_postgres, pg)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    """A Redis Cluster of three masters with a replica each (embedded Valkey), for the
    session: started by the first test that runs on it."""
    cluster = cluster_or_skip(tmp_path_factory.mktemp("cluster"))
    try:
        yield cluster
    finally:
        stop_cluster(cluster)


def cluster_or_skip(root: Path) -> EmbeddedCluster:
    """A started cluster, or the test skips when no Valkey binaries are installed."""
    try:
        valkey_cli()
    except EmbeddedServerError as exc:
        pytest.skip(f"no Redis Cluster to run on: {exc}")
    return start_cluster(root)


# Runs a test once on one Redis and once on a Redis Cluster (sharded pub/sub).
on_both_engines = pytest.mark.parametrize("redis_url", ["redis", "cluster"], indirect=True)


@pytest.fixture
def redis_url(servers: tuple[str, str], request: pytest.FixtureRequest) -> str:
    """The suite's Redis; the session's Redis Cluster for a test `on_both_engines` asks for it."""
    if getattr(request, "param", "redis") == "cluster":
        cluster: EmbeddedCluster = request.getfixturevalue("redis_cluster")
        return cluster.url
    return servers[1]


@pytest.fixture
def settings(database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings for a process of this test: its own database, Redis channel and workspace
    root, a free port."""
    return Settings(database_url=database_url, redis_url=redis_url, port=0, node_id="test-node",
                    channel=f"taskcast:test:{os.getpid()}:{next(_counter)}",
                    workspace_root=str(tmp_path_factory.mktemp("workspaces")))


@pytest.fixture
async def event_log(database_url: str) -> AsyncIterator[EventLog]:
    pool = await db.create_pool(database_url, max_size=20)
    try:
        yield EventLog(pool)
    finally:
        await pool.close()


@pytest.fixture
async def taskcast(settings: Settings) -> AsyncIterator[Process]:
    """A whole taskcast process (server, relay, two workers) on a free port."""
    async with Process(settings, Roles(serve=True, relay=True, workers=2)) as process:
        assert process.relay is not None
        await asyncio.wait_for(process.relay.leading.wait(), 10)
        yield process


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[Restartable]:
    """A server this test can restart on the same port (tests/restarting.py)."""
    restartable = Restartable(settings)
    await restartable.start()
    try:
        yield restartable
    finally:
        await restartable.stop()


def ws_url(process: Process) -> str:
    return f"ws://127.0.0.1:{process.settings.port}/ws"


@pytest.fixture
async def launch(settings: Settings) -> AsyncIterator[Launch]:
    """Start processes with changed settings: `await launch(rate_per_s=5, workers=0)`."""
    stack = AsyncExitStack()

    async def start(*, workers: int = 2, relay: bool = True, **changes: object) -> Process:
        process = await stack.enter_async_context(
            Process(settings.with_(**changes), Roles(serve=True, relay=relay, workers=workers)))
        if relay:
            assert process.relay is not None
            await asyncio.wait_for(process.relay.leading.wait(), 10)
        return process

    async with stack:
        yield start
