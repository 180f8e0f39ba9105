"""Listing task views: a principal's scope patterns become exact SQL patterns."""

from __future__ import annotations

from events.log import CreateTask, EventLog
from events.tasks import TaskQuery, like, list_tasks


def test_scope_patterns_become_like_patterns_with_the_rest_escaped() -> None:
    """`*` and `?` are the only wildcards; LIKE's own `%`, `_` and `\\` match themselves."""
    assert like("repo:acme/*") == "repo:acme/%"
    assert like("a_b?c%d\\") == "a\\_b_c\\%d\\\\"


async def test_a_wildcard_grant_lists_exactly_its_scopes(event_log: EventLog) -> None:
    """A principal holding `repo:acme/*` and `a_b:1` lists the tasks of those scopes only:
    not `repo:other`, not `axb:1` (`_` is no wildcard in a grant)."""
    mine = [(await event_log.create(CreateTask(kind="demo", scope=s))).task
            for s in ("repo:acme/api", "repo:acme/web", "a_b:1")]
    for scope in ("repo:other", "axb:1", "repo:acme"):
        await event_log.create(CreateTask(kind="demo", scope=scope))
    page = await list_tasks(event_log.pool, TaskQuery(scope_patterns=("repo:acme/*", "a_b:1"), limit=50))
    assert sorted(v["id"] for v in page.tasks) == sorted(mine)
