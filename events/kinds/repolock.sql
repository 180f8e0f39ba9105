-- The worker-side lock on one repository (events/kinds/repolock.py): a session-level
-- advisory lock keyed by the scope and the repository's real path. Kept beside its module:
-- it belongs to the built-in kinds, not to the event log's schema.

-- name: repo_try_lock
SELECT pg_try_advisory_lock(hashtextextended('taskcast.repo:' || $1, 0));

-- name: repo_unlock
SELECT pg_advisory_unlock(hashtextextended('taskcast.repo:' || $1, 0));
