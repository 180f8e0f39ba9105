"""One action at a time per repository, whatever name it was given (invariant 9, the README).

The node cannot see the disk, so the queue's `mutex` cannot know that `repo`, `repo/`,
`repo/src`, `link-to-repo` and `x/../repo` are one repository, and it cannot include the
scope either (it sees only the input). So the built-in kinds take no queue mutex; the
worker takes this lock instead, once it has resolved the repository on its disk:
- the key is the scope plus the repository's identity, the real path of the directory
  holding its git directory (`identity`): symlinks, `..`, trailing slashes, subdirectories
  and linked worktrees all come to the same key, and another scope's never does;
- the lock is a PostgreSQL session advisory lock on a connection held for the action, so
  it holds across worker processes and machines, and is released if the worker dies (its
  session ends) as surely as when the action ends.
A task waiting for the lock holds its worker slot; it waits at most LOCK_WAIT_S (then
fails, retryable), and a cancel or timeout stops the wait at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import cache
from pathlib import Path

from events import db
from events.kind import StepError, TaskContext
from events.sql import parse

LOCK_POLL_S = 0.05
LOCK_WAIT_S = 3600.0


@cache
def _queries() -> dict[str, str]:
    return parse((Path(__file__).parent / "repolock.sql").read_text())


def key(scope: str, identity: Path) -> str:
    """The lock key of a repository (pure): the scope and the repository's real path."""
    return f"{len(scope)}:{scope}:{identity}"  # length-prefixed: no two (scope, path) pairs meet


@asynccontextmanager
async def holding(ctx: TaskContext, identity: Path) -> AsyncIterator[None]:
    """Hold the lock of the repository `identity` in the task's scope while the body runs.
    Raises TaskCancelled (cancel, timeout), StepError (waited LOCK_WAIT_S)."""
    name = key(ctx.scope, identity)
    loop = asyncio.get_running_loop()
    until = loop.time() + LOCK_WAIT_S
    async with db.acquire(ctx.log.pool) as conn:
        try:
            while not await conn.fetchval(_queries()["repo_try_lock"], name):
                ctx.check_cancelled()
                if loop.time() >= until:
                    raise StepError(f"another action held the repository for {LOCK_WAIT_S:g}s",
                                    retryable=True)
                try:
                    async with asyncio.timeout(LOCK_POLL_S):
                        await ctx.cancelled.wait()
                except TimeoutError:
                    pass
        except BaseException:
            # Cut short, a try may still have been granted on the server: a lock held by a
            # pooled connection would block the repository until that connection closes.
            conn.terminate()
            raise
        try:
            yield
        finally:
            # A lock left held would block the repository until the connection closes (the
            # pool does not reset connections, events/db.py): when the unlock cannot be
            # seen to finish, the connection is ended, and its session's locks with it.
            try:
                await asyncio.shield(conn.fetchval(_queries()["repo_unlock"], name))
            except BaseException:
                conn.terminate()
                raise
