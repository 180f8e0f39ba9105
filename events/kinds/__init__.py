"""Task kinds: async workflows of named steps. The API is in `events.kind` (KindSpec,
TaskContext); this package holds the built-in kinds.

A kind is a `KindSpec`: its `run(ctx)` coroutine, an optional `cleanup(ctx)` run after a
cancel or timeout, how many attempts a retryable failure gets, an optional `mutex`
(jobs with the same one, e.g. one repository, run one at a time), and an optional
`validate(input)`: a cheap, pure check run by the node before the `create` is acked, which
raises `events.errors.BadRequest` naming the field (`input.steps`), so a task that can
never run is refused at once instead of failing in a worker. Plugins are registered
by import path (`TASKCAST_KINDS=package.module:attr`); the attr is a KindSpec or a bare
`async def attr(ctx)`.

The built-in kinds touch the disk only inside their task's scope directory under the
workspace root (`events.kinds.workspace`), and their child processes belong to their task
attempt (`events.attempt`). They take no queue `mutex`: actions on one repository are
serialized by the worker, which alone can see which paths name the same one
(`events.kinds.repolock`). Each runs at most PROCESS_KINDS_RUNNING at once per worker
(`KindSpec.max_running`), below the worker's concurrency, which short tasks want high.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from events.kind import KindSpec, TaskContext, as_kind

__all__ = ["KindSpec", "TaskContext", "as_kind", "builtin"]

# How many tasks of each built-in kind that runs processes (all but `demo`) one worker runs
# at once, whatever its concurrency: twice the cores keeps them busy without thrashing.
PROCESS_KINDS_RUNNING = 2 * (os.cpu_count() or 1)


def builtin(shell_allow: Sequence[str] = (), *, clone_roots: Sequence[str] = ()) -> dict[str, KindSpec]:
    """The kinds that ship with taskcast, by name. `shell` runs only the commands named in
    `shell_allow` (Settings.shell_allow, from TASKCAST_SHELL_ALLOW); none: it is disabled.
    `git.clone` reads local repositories outside the scope's directory only under
    `clone_roots` (Settings.clone_roots, from TASKCAST_CLONE_ROOTS)."""
    from events.kinds.demo import DEMO
    from events.kinds.git import make_clone
    from events.kinds.provision import PROVISION
    from events.kinds.repo import REBASE_BRANCH, REGISTER_BRANCH, RESTACK, SYNC
    from events.kinds.shell import make_shell

    processes = (PROVISION, make_clone(clone_roots), SYNC, REBASE_BRANCH, RESTACK, REGISTER_BRANCH,
                 make_shell(list(shell_allow)))
    kinds = (DEMO, *(dataclasses.replace(k, max_running=PROCESS_KINDS_RUNNING) for k in processes))
    return {k.name: k for k in kinds}
