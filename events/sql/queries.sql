-- Named queries, loaded once by events/sql.py. Each starts with `-- name: <name>`.
-- Positions are (xid, seq) pairs; "after P" reads only rows below the snapshot's xmin, so a
-- transaction that commits later can never land behind a position already read (invariant 4).

-- name: read_after
SELECT e.xid, e.seq, e.task_id, e.version, e.scope, e.type, e.data, e.at
  FROM events AS e
 WHERE (e.xid, e.seq) > ($1::xid8, $2::bigint)
   AND e.xid < pg_snapshot_xmin(pg_current_snapshot())
 ORDER BY e.xid, e.seq
 LIMIT $3;

-- name: read_after_scope
SELECT e.xid, e.seq, e.task_id, e.version, e.scope, e.type, e.data, e.at
  FROM events AS e
 WHERE e.scope = $4
   AND (e.xid, e.seq) > ($1::xid8, $2::bigint)
   AND e.xid < pg_snapshot_xmin(pg_current_snapshot())
 ORDER BY e.xid, e.seq
 LIMIT $3;

-- name: read_after_task
SELECT e.xid, e.seq, e.task_id, e.version, e.scope, e.type, e.data, e.at
  FROM events AS e
 WHERE e.task_id = $4
   AND (e.xid, e.seq) > ($1::xid8, $2::bigint)
   AND e.xid < pg_snapshot_xmin(pg_current_snapshot())
 ORDER BY e.version
 LIMIT $3;

-- name: head
SELECT e.xid, e.seq
  FROM events AS e
 WHERE e.xid < pg_snapshot_xmin(pg_current_snapshot())
 ORDER BY e.xid DESC, e.seq DESC
 LIMIT 1;

-- name: history
SELECT e.xid, e.seq, e.task_id, e.version, e.scope, e.type, e.data, e.at
  FROM events AS e
 WHERE e.task_id = $1 AND e.version > $2
 ORDER BY e.version
 LIMIT $3;

-- name: history_until
SELECT e.xid, e.seq, e.task_id, e.version, e.scope, e.type, e.data, e.at
  FROM events AS e
 WHERE e.task_id = $1 AND e.version <= $2
 ORDER BY e.version;

-- name: get_view
SELECT t.view, t.version, e.xid, e.seq
  FROM tasks AS t
  LEFT JOIN events AS e ON e.task_id = t.id AND e.version = t.version
 WHERE t.id = $1;

-- name: append
SELECT xid, seq, version
  FROM taskcast_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12);

-- name: create
SELECT task, status, xid, seq, duplicate
  FROM taskcast_create($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12);

-- name: command_key
SELECT k.task_id, k.status, k.xid, k.seq
  FROM command_keys AS k
 WHERE k.principal = $1 AND k.key = $2 AND k.created_at >= now() - interval '24 hours';

-- name: claim
WITH next AS (
    SELECT j.task_id
      FROM jobs AS j
     WHERE j.state = 'queued' AND j.run_at <= now() AND j.kind = ANY ($2::text[])
     ORDER BY j.priority DESC, j.run_at, j.task_id
     LIMIT $3
       FOR UPDATE SKIP LOCKED
)
UPDATE jobs AS j
   SET state = 'running', lease_owner = $1,
       lease_expires_at = now() + make_interval(secs => $4),
       fence = j.fence + 1, attempt = j.attempt + 1
  FROM next, tasks AS t
 WHERE j.task_id = next.task_id AND t.id = j.task_id
RETURNING j.task_id, j.fence, j.attempt, j.cancel_requested, t.view, t.version;

-- name: heartbeat
UPDATE jobs AS j
   SET lease_expires_at = now() + make_interval(secs => $3)
 WHERE j.task_id = $1 AND j.fence = $2 AND j.state = 'running' AND j.lease_expires_at > now()
RETURNING j.cancel_requested;

-- name: rescue
-- Re-queue jobs whose lease expired. The conditions are checked again inside the UPDATE,
-- so a job that completed (or was re-leased) a moment ago is never overwritten.
UPDATE jobs AS j
   SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL, fence = j.fence + 1,
       run_at = now()
 WHERE j.state = 'running' AND j.lease_expires_at < now()
RETURNING j.task_id;

-- name: relay_cursor
SELECT xid, seq FROM relay_cursor;

-- name: save_relay_cursor
INSERT INTO relay_cursor (id, xid, seq) VALUES (true, $1, $2)
ON CONFLICT (id) DO UPDATE SET xid = excluded.xid, seq = excluded.seq
 WHERE (relay_cursor.xid, relay_cursor.seq) < (excluded.xid, excluded.seq);
