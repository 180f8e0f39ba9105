"""The layout keeps its promises: no import circle between modules, nothing imports the
Node, asyncpg stays inside events/, and the gateway makes no blocking call."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "events", "cli")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, everywhere: bool = False) -> set[str]:
    """Modules `path` imports at import time (not under TYPE_CHECKING, not inside functions,
    unless `everywhere`)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    nodes = ast.walk(tree) if everywhere else iter(tree.body)
    for node in nodes:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module(p): p for p in files}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_module_imports_itself_back() -> None:
    """Import time has no cycle: each layer can be read (and tested) without the ones above."""
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_nothing_but_the_process_imports_the_node() -> None:
    """Parts of a node see `Services`, never the Node that composes them."""
    importers = sorted(m for m, deps in _graph().items() if "server.node" in deps)
    assert importers == ["cli.process"]


def test_asyncpg_is_imported_only_inside_events() -> None:
    """The gateway and the CLI see events' errors and types, never asyncpg's."""
    for pkg in ("server", "cli"):
        for path in (ROOT / pkg).rglob("*.py"):
            assert not any(m.split(".")[0] == "asyncpg" for m in _imports(path, everywhere=True)), path


_BLOCKING_CALLS = {"time.sleep", "open", "input", "os.system", "os.popen", "os.wait", "os.waitpid",
                   "socket.create_connection", "socket.getaddrinfo", "select.select"}
_BLOCKING_METHODS = {"read_text", "read_bytes", "write_text", "write_bytes", "sendall", "makefile"}
_SYNC_CLIENTS = {"subprocess", "requests", "urllib.request", "http.client", "psycopg", "psycopg2",
                 "redis.client"}


def test_the_gateway_makes_no_blocking_call() -> None:
    """Invariant 8: nothing in server/ (the gateway, which runs every socket on one loop)
    sleeps, reads or writes a file, runs a process or uses a synchronous network client;
    such work belongs to the workers, or to a thread."""
    for path in (ROOT / "server").rglob("*.py"):
        tree = ast.parse(path.read_text())
        imported = _imports(path, everywhere=True)
        assert not {m for m in imported if m in _SYNC_CLIENTS or m == "redis"}, (path, imported)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                method = node.func.attr if isinstance(node.func, ast.Attribute) else None
                assert name not in _BLOCKING_CALLS and method not in _BLOCKING_METHODS, \
                    f"{path.relative_to(ROOT)}:{node.lineno}: {name}() blocks the loop"
