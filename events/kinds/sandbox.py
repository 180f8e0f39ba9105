"""provision's sandbox: the agent runs inside bubblewrap (`bwrap`) where the host allows it.

Inside, the agent sees (`argv`):
- its workspace, read-write, at the same path as outside (so paths in its state file mean
  the same thing on both sides); the rest of the workspace root is an empty tmpfs, so no
  other workspace, of its scope or any other, is visible;
- read-only: /usr (and /bin, /lib, /lib64, /sbin as the host has them), the Python it
  runs on (`sys.prefix`, `sys.base_prefix`) and the `events` package it imports;
- its own empty /tmp, a minimal /dev, no /proc, no /etc (with `network`: /etc/hosts,
  /etc/resolv.conf and the CA certificates, read-only);
- no network unless `network`: a network namespace of its own, with only a loopback
  that nobody else shares. It still answers the worker, on a listening socket the worker
  made on its own loopback and handed in (agent `--listen-fd`);
- its own IPC and UTS namespaces, no capabilities, a new session (no terminal to inject
  into).
Not isolated: the process IDs (no PID namespace, since the agent must outlive the
sandbox's starter and be stoppable by its pid) and the user: run workers as an
unprivileged user so that the agent cannot signal other processes.

Where `bwrap` is missing, or cannot create namespaces here (`available`, probed once per
process), provision falls back to the plain directory and says so in the task's output.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

import events

PROBE_S = 10.0
SYSTEM_LINKS = ("/bin", "/lib", "/lib64", "/sbin")
NETWORK_FILES = ("/etc/hosts", "/etc/resolv.conf", "/etc/ssl", "/etc/ca-certificates")
_available: dict[str, bool] = {}


def argv(command: list[str], workspace: Path, hide: Path, *, network: bool = False) -> list[str]:
    """`command` wrapped in bwrap, seeing only `workspace` of everything under `hide` (the
    workspace root). Pure, but for looking at which of SYSTEM_LINKS are symlinks."""
    # Order matters: a later mount covers an earlier one (the tmpfs over the workspace root
    # hides the other workspaces, then this workspace is bound back on top of it).
    args = ["bwrap", "--dev", "/dev", "--tmpfs", "/tmp", "--ro-bind", "/usr", "/usr"]
    for link in SYSTEM_LINKS:
        if os.path.islink(link):
            args += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            args += ["--ro-bind", link, link]
    package = str(Path(events.__file__).resolve().parent)
    for path in dict.fromkeys((sys.prefix, sys.base_prefix, package)):
        if not path.startswith("/usr/"):
            args += ["--ro-bind", path, path]
    if network:
        for path in NETWORK_FILES:
            args += ["--ro-bind-try", path, path]
    else:
        args += ["--unshare-net"]
    args += ["--tmpfs", str(hide), "--bind", str(workspace), str(workspace),
             "--chdir", str(workspace), "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
             "--cap-drop", "ALL", "--new-session", "--", *command]
    return args


async def available() -> bool:
    """Whether bwrap is installed and can make its namespaces here (probed once)."""
    if "bwrap" not in _available:
        _available["bwrap"] = await _probe()
    return _available["bwrap"]


async def _probe() -> bool:
    if shutil.which("bwrap") is None:
        return False
    try:
        proc = await asyncio.create_subprocess_exec(
            "bwrap", "--ro-bind", "/", "/", "--unshare-net", "--unshare-ipc", "--cap-drop", "ALL", "true",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
    except OSError:
        return False
    try:
        async with asyncio.timeout(PROBE_S):
            return await proc.wait() == 0
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return False
