"""`provision`: a named workspace with a running agent and a session open in it.

Input: {"name"?: str, "root"?: absolute path, "approve"?: bool}. `name` defaults to a
fresh readable one (brave-otter); `root` to `taskcast-workspaces` under the system temp
dir. Unless `approve` is true, one `command_approval` question ("approve"/"deny") is asked
before anything is created; "deny" fails the task and leaves nothing behind.

Steps: `ensure_name`, `create_sandbox` (the directory `root/name`), `ensure_agent` (the
agent of `events.kinds.agent`, reused when one already serves the directory),
`create_session`. The task completes once the session is open, leaving the agent running:
result {"name", "dir", "agent": {"pid", "address"}, "session"}. A cancel or timeout stops
the agent (cleanup), and so does a failure that ends the task; the directory stays, so
`retry` can resume.

Steps run at least once: the directory may already exist (marked with the task that
created it), and an agent from an interrupted attempt is found through the state file it
writes before reporting ready. A completed `ensure_agent` whose agent has died since is
replaced by `create_session`, which reports the agent it actually used.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from events.errors import BadRequest
from events.kinds import KindSpec, proc
from events.kinds.agent import STATE_FILE
from events.runtime import StepError, TaskContext

AGENT = (sys.executable, "-m", "events.kinds.agent")
MARKER = ".taskcast-task"  # which task created the workspace
MAX_ATTEMPTS = 3
AGENT_START_S = 30.0
REQUEST_S = 5.0
STOP_S = 3.0
NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
ADJECTIVES = ("brave", "calm", "clever", "eager", "fancy", "gentle", "happy", "jolly", "keen",
              "lively", "merry", "nimble", "proud", "quick", "quiet", "rapid", "shy", "silly",
              "snowy", "sunny", "swift", "tidy", "witty", "zesty", "bold", "bright", "cosy",
              "daring", "fuzzy", "golden", "humble", "lucky")
ANIMALS = ("otter", "badger", "beaver", "bison", "camel", "crane", "dingo", "eagle", "falcon",
           "ferret", "gecko", "heron", "ibex", "koala", "lemur", "llama", "lynx", "marten",
           "moose", "newt", "ocelot", "panda", "puffin", "quokka", "raven", "robin", "seal",
           "stoat", "tapir", "walrus", "wombat", "yak")


def default_root() -> Path:
    return Path(tempfile.gettempdir()) / "taskcast-workspaces"


def _root(input_: dict[str, Any]) -> Path:
    root = input_.get("root")
    if root is None:
        return default_root()
    if not isinstance(root, str) or not os.path.isabs(root):
        raise BadRequest("provision: `root` must be an absolute path")
    return Path(root)


# the agent, seen from the worker


async def request(address: str, line: str) -> str:
    """Send one request line to an agent; its answer. Raises OSError, TimeoutError."""
    host, _, port = address.rpartition(":")
    async with asyncio.timeout(REQUEST_S):
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(f"{line}\n".encode())
            await writer.drain()
            return (await reader.readline()).decode(errors="replace").strip()
        finally:
            writer.close()


async def _alive(agent: dict[str, Any]) -> bool:
    try:
        return await request(agent["address"], "PING") == f"PONG {agent['pid']}"
    except (OSError, TimeoutError, ValueError, KeyError):
        return False


def _read_state(directory: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((directory / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


async def ensure_agent(directory: Path, cancelled: asyncio.Event, *,
                       argv: Sequence[str] = AGENT) -> dict[str, Any]:
    """The agent serving `directory`, started unless one is alive: {"pid", "address"}.
    Raises StepError (retryable) when it does not start, TaskCancelled."""
    state = await asyncio.to_thread(_read_state, directory)
    if state is not None and await _alive(state):
        return {"pid": state["pid"], "address": state["address"]}
    try:
        async with asyncio.timeout(AGENT_START_S):
            done = await proc.run([*argv, "--dir", str(directory)], cancelled=cancelled)
    except TimeoutError:
        raise StepError(f"the agent did not start within {AGENT_START_S:g}s", retryable=True) from None
    if done.code != 0:
        raise StepError(f"the agent did not start: {done.last_error()}", retryable=True)
    ready = json.loads(done.stdout.strip().splitlines()[-1])
    return {"pid": ready["pid"], "address": ready["address"]}


async def stop_agent(directory: Path) -> None:
    """Stop the agent serving `directory`, if any: STOP, then SIGKILL if it lingers."""
    state = await asyncio.to_thread(_read_state, directory)
    if state is None:
        return
    pid = state.get("pid")
    pid = pid if isinstance(pid, int) else 0
    if await _alive(state):
        try:
            await request(state["address"], "STOP")
        except (OSError, TimeoutError):
            pass
    if pid > 0 and not await proc.wait_gone(pid, STOP_S) and await asyncio.to_thread(_serves, pid, directory):
        os.kill(pid, signal.SIGKILL)
        await proc.wait_gone(pid, STOP_S)
    (directory / STATE_FILE).unlink(missing_ok=True)


def _serves(pid: int, directory: Path) -> bool:
    """Whether `pid` is still the agent of `directory` (and not a reused pid)."""
    try:
        return str(directory) in psutil.Process(pid).cmdline()
    except psutil.Error:
        return False


# the kind


def _make_sandbox(directory: Path, task: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / MARKER
    try:
        owner = marker.read_text().strip()
    except FileNotFoundError:
        marker.write_text(task)
        return
    if owner != task:
        raise StepError(f"{directory} already belongs to task {owner}")


def _fresh_name(root: Path) -> str:
    for _ in range(20):
        name = f"{secrets.choice(ADJECTIVES)}-{secrets.choice(ANIMALS)}"
        if not (root / name).exists():
            return name
    return f"{name}-{secrets.token_hex(2)}"


def make_provision(*, agent: Sequence[str] = AGENT) -> KindSpec:
    """The provision kind, starting agents with the command `agent` (+ `--dir DIR`)."""

    async def run(ctx: TaskContext) -> dict[str, Any]:
        root = _root(ctx.input)
        wanted = ctx.input.get("name")
        if wanted is not None and (not isinstance(wanted, str) or not NAME.fullmatch(wanted)):
            raise BadRequest("provision: `name` must be lowercase letters, digits and dashes")
        ctx.plan(4)

        async def ensure_name() -> str:
            if isinstance(wanted, str):
                return wanted
            return await asyncio.to_thread(_fresh_name, root)

        name = await ctx.step("ensure_name", ensure_name)
        directory = root / name
        if ctx.input.get("approve") is not True:
            choice = await ctx.ask("command_approval", f"Create {directory} and start an agent in it?",
                                   options=["approve", "deny"])
            if choice != "approve":
                raise StepError(f"provisioning {name} was denied")

        async def create_sandbox() -> dict[str, Any]:
            await asyncio.to_thread(_make_sandbox, directory, ctx.task)
            return {"dir": str(directory)}

        async def start_agent() -> dict[str, Any]:
            return await ensure_agent(directory, ctx.cancelled, argv=agent)

        async def create_session() -> dict[str, Any]:
            live = await ensure_agent(directory, ctx.cancelled, argv=agent)
            address = live["address"]
            try:
                answer = await proc.until_cancelled(ctx.cancelled, request(address, f"OPEN {ctx.task}"))
            except (OSError, TimeoutError) as exc:
                raise StepError(f"the agent at {address} did not answer: {exc!r}", retryable=True) from exc
            kind, _, session = answer.partition(" ")
            if kind != "SESSION" or not session:
                raise StepError(f"the agent refused a session: {answer[:200]!r}", retryable=True)
            return {"session": session, "agent": live}

        await ctx.step("create_sandbox", create_sandbox)
        # A run that ends failed, cancelled or timed out runs the cleanup: no agent outlives it.
        await ctx.step("ensure_agent", start_agent)
        opened = await ctx.step("create_session", create_session)
        return {"name": name, "dir": str(directory), **opened}

    return KindSpec("provision", run, cleanup=_cleanup, max_attempts=MAX_ATTEMPTS)


async def _cleanup(ctx: TaskContext) -> None:
    """Stop the task's agent (the workspace stays, for a `retry`)."""
    created = ctx.result_of("create_sandbox")
    if created:
        await stop_agent(Path(created["dir"]))


PROVISION = make_provision()
