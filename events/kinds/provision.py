"""`provision`: a named workspace with a running agent and a session open in it.

Input: {"name"?: str, "root"?: path, "approve"?: bool, "network"?: bool}. `root` is a
directory relative to the task's scope directory (events.kinds.workspace), "." (the scope
directory itself) by default; the workspace is `root/name`. `name` defaults to a fresh
readable one (brave-otter). Unless `approve` is true, one `command_approval` question
("approve"/"deny") is asked before anything is created; "deny" fails the task and leaves
nothing behind.

Steps: `ensure_name`, `create_sandbox` (the directory `root/name`, resolved by real path
inside the scope directory), `ensure_agent` (the agent of `events.kinds.agent`, reused
when one already serves the directory), `create_session`. The agent runs inside a
bubblewrap sandbox bound to its workspace where the host has `bwrap` (events.kinds.sandbox;
no network unless `network`), else in the plain directory; `ensure_agent`'s output says
which, and its result carries "sandbox": "bubblewrap" or "directory". The agent's
environment holds nothing of the worker's: PATH, HOME (the workspace), LANG, and the
task-attempt markers (events.attempt).
The task completes once the session is open, leaving the agent running: result {"name",
"dir" (relative to the scope directory), "agent": {"pid", "address"}, "sandbox",
"session"}. A cancel or timeout stops the agent (cleanup), and so does a failure that ends
the task; the directory stays, so `retry` can resume.

Steps run at least once: the directory may already exist (marked with the task that
created it). One agent per workspace, ever: a step that runs again on a later claim first
kills whatever the dead claim's run of it left (events.attempt), a half-started agent
included; the agent holds a lock on its workspace for its life, so a second one for the
same workspace refuses to start and the live one is used. A completed `ensure_agent`
whose agent has died since is replaced by `create_session`, which reports the agent it
actually used.
"""

from __future__ import annotations

import asyncio
import json
import os
import posixpath
import re
import secrets
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from events.errors import BadRequest
from events.kind import KindSpec, StepError, TaskContext
from events.kinds import proc, sandbox, workspace
from events.kinds.agent import EXIT_BUSY, STATE_FILE

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


def validate(input_: Mapping[str, Any]) -> None:
    workspace.relative(input_.get("root", "."), "provision: `input.root`")
    wanted = input_.get("name")
    if wanted is not None and (not isinstance(wanted, str) or not NAME.fullmatch(wanted)):
        raise BadRequest("provision: `input.name` must be 1..63 lowercase letters, digits and dashes")
    for flag in ("approve", "network"):
        if not isinstance(input_.get(flag, False), bool):
            raise BadRequest(f"provision: `input.{flag}` must be true or false")


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


def agent_env(directory: Path) -> dict[str, str]:
    """The agent's whole environment (before the attempt markers are added)."""
    return {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(directory), "LANG": "C.UTF-8"}


async def _live(directory: Path) -> dict[str, Any] | None:
    state = await asyncio.to_thread(_read_state, directory)
    if state is not None and await _alive(state):
        return {"pid": state["pid"], "address": state["address"]}
    return None


async def ensure_agent(directory: Path, cancelled: asyncio.Event, *, argv: Sequence[str] = AGENT,
                       sandbox_root: Path | None = None, network: bool = False) -> dict[str, Any]:
    """The agent serving `directory`, started unless one is alive: {"pid", "address"}.
    With `sandbox_root` (the workspace root) it starts inside bubblewrap, seeing only
    `directory` of that root. Raises StepError (retryable) when it does not start,
    TaskCancelled."""
    live = await _live(directory)
    if live is not None:
        return live
    # The worker makes the agent's socket, so an agent without network still answers here.
    listener = socket.create_server(("127.0.0.1", 0))
    command = [*argv, "--dir", str(directory), "--listen-fd", str(listener.fileno())]
    if sandbox_root is not None:
        command = sandbox.argv(command, directory, sandbox_root, network=network)
    try:
        async with asyncio.timeout(AGENT_START_S):
            # Not bound to the worker: the agent outlives it (events.attempt).
            done = await proc.run(command, cwd=str(directory), env=agent_env(directory), cancelled=cancelled,
                                  bound=False, pass_fds=(listener.fileno(),))
            if done.code == EXIT_BUSY:  # another agent holds the workspace: wait until it answers
                while (live := await _live(directory)) is None:
                    await proc.until_cancelled(cancelled, asyncio.sleep(0.05))
                return live
    except TimeoutError:
        raise StepError(f"the agent did not start within {AGENT_START_S:g}s", retryable=True) from None
    except OSError as exc:
        raise StepError(f"the agent could not be started: {exc}", retryable=True) from exc
    finally:
        listener.close()
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


def _workspace(home: Path, shown: str) -> Path:
    directory = workspace.resolve(home, shown, "provision: `input.root`/`input.name`")
    if directory == home:
        raise workspace.Escape("provision: the workspace resolves to the scope's directory itself")
    return directory


def make_provision(*, agent: Sequence[str] = AGENT, sandboxed: bool | None = None) -> KindSpec:
    """The provision kind, starting agents with the command `agent` (+ `--dir DIR
    --listen-fd FD`); `sandboxed`: in bubblewrap (None: where available)."""

    async def run(ctx: TaskContext) -> dict[str, Any]:
        validate(ctx.input)  # the worker trusts no input either
        root = workspace.relative(ctx.input.get("root", "."), "provision: `input.root`")
        wanted = ctx.input.get("name")
        network = ctx.input.get("network") is True
        home = await asyncio.to_thread(workspace.scope_dir, ctx.workspace_root, ctx.scope)
        ctx.plan(4)

        async def ensure_name() -> str:
            if isinstance(wanted, str):
                return wanted
            base = await asyncio.to_thread(workspace.resolve, home, root, "provision: `input.root`")
            return await asyncio.to_thread(_fresh_name, base)

        name = await ctx.step("ensure_name", ensure_name)
        shown = posixpath.normpath(posixpath.join(root, name))
        if ctx.input.get("approve") is not True:
            choice = await ctx.ask("command_approval", f"Create {shown} and start an agent in it?",
                                   options=["approve", "deny"])
            if choice != "approve":
                raise StepError(f"provisioning {name} was denied")

        async def create_sandbox() -> dict[str, Any]:
            directory = await asyncio.to_thread(_workspace, home, shown)
            await asyncio.to_thread(_make_sandbox, directory, ctx.task)
            return {"dir": shown}

        async def start() -> dict[str, Any]:
            directory = await asyncio.to_thread(_workspace, home, shown)
            use = sandboxed if sandboxed is not None else await sandbox.available()
            if use:
                ctx.output([f"sandbox: bubblewrap, seeing only {shown} of the workspaces"
                            f"{', with network' if network else ', no network'}"])
            else:
                ctx.output(["sandbox: none (bwrap is not available here): the agent runs in the plain "
                            f"directory {shown}"])
            live = await ensure_agent(directory, ctx.cancelled, argv=agent, network=network,
                                      sandbox_root=home.parent if use else None)
            return {**live, "sandbox": "bubblewrap" if use else "directory"}

        async def start_agent() -> dict[str, Any]:
            return await start()

        async def create_session() -> dict[str, Any]:
            live = await start()
            address = live["address"]
            try:
                answer = await proc.until_cancelled(ctx.cancelled, request(address, f"OPEN {ctx.task}"))
            except (OSError, TimeoutError) as exc:
                raise StepError(f"the agent at {address} did not answer: {exc!r}", retryable=True) from exc
            kind, _, session = answer.partition(" ")
            if kind != "SESSION" or not session:
                raise StepError(f"the agent refused a session: {answer[:200]!r}", retryable=True)
            sandboxed_as = live.pop("sandbox")
            return {"session": session, "agent": live, "sandbox": sandboxed_as}

        await ctx.step("create_sandbox", create_sandbox)
        # A run that ends failed, cancelled or timed out runs the cleanup: no agent outlives it.
        await ctx.step("ensure_agent", start_agent)
        opened = await ctx.step("create_session", create_session)
        return {"name": name, "dir": shown, **opened}

    return KindSpec("provision", run, cleanup=_cleanup, max_attempts=MAX_ATTEMPTS, validate=validate)


async def _cleanup(ctx: TaskContext) -> None:
    """Stop the task's agent (the workspace stays, for a `retry`)."""
    created = ctx.result_of("create_sandbox")
    if not created:
        return
    try:
        home = await asyncio.to_thread(workspace.scope_dir, ctx.workspace_root, ctx.scope)
        directory = await asyncio.to_thread(_workspace, home, created["dir"])
    except StepError:
        return
    await stop_agent(directory)


PROVISION = make_provision()
