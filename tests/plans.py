"""The plans PostgreSQL runs for a connection's statements, those inside functions included
(auto_explain, reporting to the client), to test how much a statement reads."""

from __future__ import annotations

import re
from collections.abc import Iterator

import asyncpg

_SETTINGS = ("LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0; "
             "SET auto_explain.log_nested_statements = on; SET auto_explain.log_analyze = on; "
             "SET auto_explain.log_level = notice; SET client_min_messages = notice")
_NODE = re.compile(r"^\s*(->\s*)?[A-Z][A-Za-z ]+ (on|using|\(cost)")
_DISCARDED = re.compile(r"Rows Removed by (Join )?Filter: (\d+)")


async def explaining(conn: asyncpg.Connection) -> list[str]:
    """From now on, the plan of each statement `conn` runs is appended to the list returned."""
    plans: list[str] = []
    conn.add_log_listener(lambda _conn, message: plans.append(message.message))
    await conn.execute(_SETTINGS)
    return plans


def _nodes(plans: list[str]) -> Iterator[tuple[str, list[str]]]:
    """Each plan node's line, and the detail lines under it (conditions, rows removed)."""
    for plan in plans:
        node: str | None = None
        details: list[str] = []
        for line in plan.splitlines():
            if _NODE.match(line):
                if node is not None:
                    yield node, details
                node, details = line, []
            elif node is not None:
                details.append(line)
        if node is not None:
            yield node, details


def most_discarded(plans: list[str], *, node: str = "") -> int:
    """The most rows one plan node (whose line contains `node`) read and threw away: a
    filter's, or a join's (each pair of rows a nested loop compared and did not keep)."""
    return max((int(found[2]) for line, details in _nodes(plans) if node in line
                for detail in details if (found := _DISCARDED.search(detail))), default=0)


def whole_scans(plans: list[str], tables: tuple[str, ...]) -> list[str]:
    """The plan nodes that read all of one of `tables`: a sequential scan, or an index scan
    with no Index Cond (the whole index, in its order)."""
    found: list[str] = []
    for line, details in _nodes(plans):
        node = line.strip().removeprefix("->").strip()
        if not any(f" on {t} " in f"{node} " for t in tables):
            continue
        if node.startswith("Seq Scan") or ("Index" in node and "Scan" in node
                                           and not any("Index Cond" in d for d in details)):
            found.append(node)
    return found
