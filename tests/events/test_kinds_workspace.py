"""Tenants' files stay in their scope's directory: two principals with different scopes try
every path field of every built-in kind against each other (`..`, absolute paths, symlinks,
local clone sources), and shell runs with a clean environment."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cli.process import Process
from events.errors import BadRequest
from events.kinds import builtin
from events.kinds.git import source
from events.kinds.workspace import relative, scope_dirname
from server.protocol.auth import mint
from server.settings import from_env
from tests.conftest import Launch, ws_url
from tests.events.kinds_support import commit, git, new_repo, refused, run, scope_dir
from tests.wsclient import Client

SECRET = "isolation-test-secret-of-32-bytes-at-least"
ALICE, BOB = "tenant:alice", "tenant:bob"
SHELL_ALLOW = ("sh", "env", "pwd", "touch")
# Every path field of every built-in kind; "{p}" is the path under test.
PATH_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("git.clone", {"url": "https://example.invalid/r.git", "dest": "{p}"}, "dest"),
    ("git.clone", {"url": "{p}", "dest": "copy"}, "url"),
    ("repo.sync", {"repo": "{p}"}, "repo"),
    ("repo.rebase_branch", {"repo": "{p}", "branch": "feature", "onto": "main"}, "repo"),
    ("repo.restack", {"repo": "{p}", "stack": ["feature"]}, "repo"),
    ("repo.register_branch", {"repo": "{p}", "branch": "feature", "parent": "main"}, "repo"),
    ("shell", {"command": ["touch", "escaped"], "cwd": "{p}"}, "cwd"),
    ("provision", {"root": "{p}", "name": "escaped", "approve": True}, "root"),
]


def _with(input_: dict[str, Any], path: str) -> dict[str, Any]:
    return {k: path if v == "{p}" else v for k, v in input_.items()}


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` and its content: what a foreign task must not change."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


class Tenants:
    """A server with two principals: alice and bob, each holding only their own scope."""

    def __init__(self, process: Process, alice: Client, bob: Client) -> None:
        self.process, self.alice, self.bob = process, alice, bob
        self.alice_dir, self.bob_dir = scope_dir(process, ALICE), scope_dir(process, BOB)
        self.alice_repo = new_repo(self.alice_dir / "repo")
        git(self.alice_repo, "branch", "feature")
        commit(self.alice_repo, "secret.txt", "alice's secret\n", "a secret")


@pytest.fixture
def tenants(launch: Launch) -> Callable[..., Awaitable[Tenants]]:
    async def start(**settings: Any) -> Tenants:
        process = await launch(secret=SECRET, shell_allow=SHELL_ALLOW, **settings)
        alice = await Client.open(ws_url(process), token=mint(SECRET, "alice", [ALICE]))
        bob = await Client.open(ws_url(process), token=mint(SECRET, "bob", [BOB]))
        return Tenants(process, alice, bob)

    return start


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A secret in the worker's environment, which no task may see."""
    monkeypatch.setenv("TASKCAST_PROBE_SECRET", "s3cret-in-the-worker-env")
    yield "s3cret-in-the-worker-env"


# pure: the checks the node runs before the ack


def test_scope_directories_are_safe_and_never_shared() -> None:
    """A scope's directory name is a safe slug plus a hash: scopes that slug alike differ."""
    names = {scope_dirname(s) for s in ("a/b", "a-b", "A B", "a:b", "../..", "", "x" * 500)}
    assert len(names) == 7
    assert all(n and "/" not in n and not n.startswith(".") and len(n) < 80 for n in names)
    assert scope_dirname("project:42").startswith("project-42-")
    assert scope_dirname("project:42") == scope_dirname("project:42")


def test_relative_paths_are_checked_lexically() -> None:
    """Absolute paths, `..` that climbs out, NUL and non-strings are refused; the rest is normalized."""
    assert relative("a/./b/../c/", "x") == "a/c" and relative(".", "x") == "."
    for bad in ("/etc", "..", "../x", "a/../../x", "a\0b", "", 3, None, "x" * 2000):
        with pytest.raises(BadRequest):
            relative(bad, "x")
    with pytest.raises(BadRequest):
        relative("a/..", "x", dot=False)


@pytest.mark.parametrize("form", ["../elsewhere", "/abs/elsewhere", "a/../../elsewhere"])
def test_every_path_field_of_every_kind_is_validated_before_the_ack(form: str) -> None:
    """Each built-in kind's validate refuses `..` and absolute escapes in each path field,
    naming the field (a local absolute clone `url` is left to the worker, which alone knows
    the clone roots' and the scope's real paths)."""
    kinds = builtin(SHELL_ALLOW)
    for kind, input_, field in PATH_FIELDS:
        validate = kinds[kind].validate
        assert validate is not None, kind
        if field == "url" and form.startswith("/"):
            validate(_with(input_, form))
            continue
        with pytest.raises(BadRequest, match=rf"`input\.{field}`"):
            validate(_with(input_, form))
        validate(_with(input_, "inside/the/scope"))  # and the same field, contained, is fine


def test_clone_sources_are_network_urls_or_local_paths() -> None:
    """Network URLs pass as they are; other schemes and option-like URLs are refused."""
    for ok in ("https://example.com/a/b.git", "ssh://git@example.com/a.git", "git://example.com/a",
               "git@example.com:a/b.git"):
        assert source(ok).url == ok and not source(ok).local
    assert source("sub/../repo.git").url == "repo.git" and source("repo.git").relative
    assert source("file:///srv/repos/a.git").url == "/srv/repos/a.git" and source("/srv/a/").local
    for bad in ("ext::sh -c touch% /tmp/x", "-uhelp", "--upload-pack=touch", "ssh://-oProxyCommand=x/r",
                "fd::3", "file://otherhost/r", "http://example.com/r.git", "host:path", "../other/r.git",
                "https://", "a b", "x\0y"):
        with pytest.raises(BadRequest):
            source(bad)


def test_settings_name_the_workspace_root_and_clone_roots() -> None:
    """TASKCAST_WORKSPACE_ROOT and TASKCAST_CLONE_ROOTS (':'-separated) reach Settings."""
    settings = from_env({"TASKCAST_WORKSPACE_ROOT": "/srv/ws", "TASKCAST_CLONE_ROOTS": "/srv/a:/srv/b"})
    assert settings.workspace_root == "/srv/ws" and settings.clone_roots == ("/srv/a", "/srv/b")
    assert from_env({}).workspace_root == "" and from_env({}).clone_roots == ()


def test_a_worker_refuses_to_start_without_a_workspace_root() -> None:
    """`taskcast worker` with no TASKCAST_WORKSPACE_ROOT exits at once, saying what to set."""
    env = {k: v for k, v in os.environ.items() if k != "TASKCAST_WORKSPACE_ROOT"}
    env.update(DATABASE_URL="postgresql://127.0.0.1:1/none", REDIS_URL="redis://127.0.0.1:1/0")
    done = subprocess.run([sys.executable, "-m", "cli.main", "worker"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and "TASKCAST_WORKSPACE_ROOT" in done.stderr


# end to end: bob against alice's files


@pytest.mark.parametrize("form", ["absolute", "dotdot"])
async def test_escapes_in_every_path_field_of_every_kind_are_refused(
        tenants: Callable[..., Awaitable[Tenants]], form: str) -> None:
    """Bob names alice's directory through each path field of each kind (absolute, `../`):
    every task is refused (at the ack, or failed), and alice's files are as they were."""
    t = await tenants()
    before = _snapshot(t.alice_dir)
    for kind, input_, field in PATH_FIELDS:
        target = {"dest": "stolen", "url": "repo", "repo": "repo", "cwd": ".", "root": "."}[field]
        path = str(t.alice_dir / target) if form == "absolute" else f"../{t.alice_dir.name}/{target}"
        reason = await refused(t.bob, kind, _with(input_, path), scope=BOB)
        assert "scope's workspace" in reason and f"`input.{field}`" in reason, (kind, field, reason)
    assert _snapshot(t.alice_dir) == before
    assert sorted(p.name for p in t.alice_dir.iterdir()) == ["repo"]
    assert [p.name for p in t.bob_dir.iterdir()] == []


async def test_a_symlink_out_of_the_workspace_is_not_followed(
        tenants: Callable[..., Awaitable[Tenants]]) -> None:
    """A symlink in bob's directory to alice's: every path field that goes through it fails
    the task on the worker ("resolves outside"), and alice's files are as they were."""
    t = await tenants()
    (t.bob_dir / "link").symlink_to(t.alice_dir)
    before = _snapshot(t.alice_dir)
    for kind, input_, field in PATH_FIELDS:
        target = {"dest": "link/stolen", "url": "link/repo", "repo": "link/repo", "cwd": "link",
                  "root": "link"}[field]
        reason = await refused(t.bob, kind, _with(input_, target), scope=BOB)
        assert "resolves outside the scope's workspace" in reason, (kind, field, reason)
    assert _snapshot(t.alice_dir) == before
    assert sorted(p.name for p in t.alice_dir.iterdir()) == ["repo"]


async def test_a_foreign_repository_cannot_be_cloned_by_path_or_file_url(
        tenants: Callable[..., Awaitable[Tenants]]) -> None:
    """Bob cloning alice's repository by its path or its file:// URL fails; nothing is
    cloned. Alice cloning her own, by relative path or file:// URL, works."""
    t = await tenants()
    for url in (str(t.alice_repo), t.alice_repo.as_uri(), str(t.alice_repo / ".git")):
        reason = await refused(t.bob, "git.clone", {"url": url, "dest": "stolen"}, scope=BOB)
        assert "outside the scope's workspace" in reason, reason
    assert list(t.bob_dir.iterdir()) == []
    for url, dest in (("repo", "mine"), (t.alice_repo.as_uri(), "mine-too")):
        view, _ = await run(t.alice, "git.clone", {"url": url, "dest": dest}, scope=ALICE)
        assert view["status"] == "completed", view["error"]
        assert (t.alice_dir / dest / "secret.txt").read_text() == "alice's secret\n"


async def test_local_clones_outside_the_scope_need_a_clone_root(
        tenants: Callable[..., Awaitable[Tenants]], tmp_path: Path) -> None:
    """A repository under TASKCAST_CLONE_ROOTS can be cloned by path; a symlink in the
    clone root to alice's repository cannot."""
    shared = tmp_path / "shared"
    library = new_repo(shared / "library")
    t = await tenants(clone_roots=(str(shared),))
    (shared / "to-alice").symlink_to(t.alice_repo)
    view, _ = await run(t.bob, "git.clone", {"url": str(library), "dest": "library"}, scope=BOB)
    assert view["status"] == "completed", view["error"]
    assert (t.bob_dir / "library" / "README").is_file()
    reason = await refused(t.bob, "git.clone", {"url": str(shared / "to-alice"), "dest": "x"}, scope=BOB)
    assert "outside the clone roots" in reason, reason


async def test_shell_runs_in_the_scope_directory_with_a_clean_environment(
        tenants: Callable[..., Awaitable[Tenants]], clean_environment: str) -> None:
    """shell's cwd is the scope's directory, and its environment is PATH, HOME, LANG,
    TMPDIR and the attempt markers: nothing of the worker's (no secret, no database URL)."""
    t = await tenants()
    view, _ = await run(t.bob, "shell", {"command": ["pwd"]}, scope=BOB)
    assert view["status"] == "completed" and view["output_tail"] == [str(t.bob_dir)]
    view, _ = await run(t.bob, "shell", {"command": ["env"]}, scope=BOB)
    assert view["status"] == "completed", view["error"]
    env = dict(line.split("=", 1) for line in view["output_tail"])
    assert set(env) == {"PATH", "HOME", "LANG", "TMPDIR", "TASKCAST_TASK", "TASKCAST_FENCE", "TASKCAST_STEP",
                        "TASKCAST_OWNER"}
    assert env["HOME"] == str(t.bob_dir) and env["TASKCAST_TASK"] == view["id"]
    assert clean_environment not in "".join(view["output_tail"])
