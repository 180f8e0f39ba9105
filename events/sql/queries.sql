-- Named queries, loaded once by events/sql.py. Each starts with `-- name: <name>`.
-- Positions are (xid, seq) pairs; "after P" reads only rows below the bound that `writers`
-- gave just before (events/bound.py): a taskcast transaction that commits later can never land
-- behind a position already read (invariant 4), and nothing else on the server holds the
-- read back (invariant 10). Each read is its own statement, so its snapshot is taken after
-- `writers` ran: that order is what makes the bound safe (`read_after` keeps it inside one
-- function call).

-- name: writers
SELECT x0, cluster_xmin, pid, xid, age_s FROM taskcast_writers();

-- name: read_after
-- The bound, then the events below it, in one round trip (migrations/0009_reads_in_one_trip.sql):
-- $4 a task (its events in version order) or $5 a scope, or neither.
-- In the function's order (a function scan keeps it, but only ORDER BY promises it).
SELECT r.xid, r.seq, r.task_id, r.version, r.scope, r.type, r.data, r.at
  FROM taskcast_read_after($1::xid8, $2::bigint, $3::integer, $4::text, $5::text) WITH ORDINALITY AS r
 ORDER BY r.ordinality;

-- name: head
SELECT e.xid, e.seq
  FROM events AS e
 WHERE e.xid < $1::xid8
 ORDER BY e.xid DESC, e.seq DESC
 LIMIT 1;

-- name: events_behind
-- Committed events the bound still holds back (at most $2 counted), for /metrics.
SELECT count(*) FROM (SELECT 1 FROM events AS e WHERE e.xid >= $1::xid8 LIMIT $2) AS behind;

-- name: history
SELECT e.xid, e.seq, e.task_id, e.version, e.scope, e.type, e.data, e.at
  FROM events AS e
 WHERE e.task_id = $1 AND e.version > $2
 ORDER BY e.version
 LIMIT $3;

-- name: histories_until
-- The events of each task $1[i] up to version $2[i], task by task in version order. Each
-- task's are read through the (task_id, version) index: the lateral subquery, kept apart
-- by OFFSET 0, cannot become a hash join, which a young `events` table without statistics
-- would plan, reading the whole table once per call.
SELECT e.xid, e.seq, e.task_id, e.version, e.scope, e.type, e.data, e.at, e.snapshot
  FROM unnest($1::text[], $2::integer[]) AS w(task_id, version)
 CROSS JOIN LATERAL (
        SELECT h.xid, h.seq, h.task_id, h.version, h.scope, h.type, h.data, h.at, h.snapshot
          FROM events AS h
         WHERE h.task_id = w.task_id AND h.version <= w.version
        OFFSET 0) AS e
 ORDER BY e.task_id, e.version;

-- name: get_view
SELECT t.view, t.version, e.xid, e.seq
  FROM tasks AS t
  LEFT JOIN events AS e ON e.task_id = t.id AND e.version = t.version
 WHERE t.id = $1;

-- name: append_batch
SELECT item, outcome, task, xid, seq, version
  FROM taskcast_append_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15);

-- name: create_batch
SELECT item, task, status, xid, seq, duplicate
  FROM taskcast_create_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12);

-- name: command_key
SELECT k.task_id, k.status, k.xid, k.seq
  FROM command_keys AS k
 WHERE k.principal = $1 AND k.key = $2 AND k.created_at >= now() - interval '24 hours';

-- name: claim
-- A claim that started tasks wakes the relay at its commit, with a NOTIFY: the relay hears
-- it from PostgreSQL before the worker has the claim's answer, a hop sooner than the Redis
-- hint appends send (events/relay/waker.py). PostgreSQL folds a transaction's identical
-- notifications into one. NOTIFYing commits take turns on one lock, which appends could
-- not afford but claims can: one per batch of jobs, and none when nothing was claimed.
SELECT c.task_id, c.fence, c.attempt, c.cancel_requested, c.view, c.version, c.xid, c.seq
  FROM taskcast_claim_start($1, $2, $3, $4, $5, $6, $7) AS c
  LEFT JOIN LATERAL (SELECT pg_notify('taskcast_events', '') WHERE c.seq IS NOT NULL) AS woken ON true;

-- name: heartbeat
-- Extend the leases ($1 tasks, $2 their fences) still held, in task order (the lock order of
-- events/commit.py); each one's cancel flag. A lease not returned is lost.
WITH held AS (
    SELECT j.task_id FROM jobs AS j
      JOIN unnest($1::text[], $2::bigint[]) AS l (task_id, fence) ON l.task_id = j.task_id
     WHERE j.fence = l.fence AND j.state = 'running' AND j.lease_expires_at > now()
     ORDER BY j.task_id
       FOR UPDATE OF j
)
UPDATE jobs AS j
   SET lease_expires_at = now() + make_interval(secs => $3)
  FROM held
 WHERE j.task_id = held.task_id
RETURNING j.task_id, j.cancel_requested;

-- name: rescue
-- Re-queue jobs whose lease expired. The conditions are checked again inside the UPDATE,
-- so a job that completed (or was re-leased) a moment ago is never overwritten. The rows
-- are only tried (SKIP LOCKED): a job a batch is writing to waits for the next round, and
-- the rescue never holds one row while waiting for another (events/commit.py: lock order).
UPDATE jobs AS j
   SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL, fence = j.fence + 1,
       run_at = now()
  FROM (SELECT d.task_id FROM jobs AS d
         WHERE d.state = 'running' AND d.lease_expires_at < now()
         ORDER BY d.task_id FOR UPDATE SKIP LOCKED) AS due
 WHERE j.task_id = due.task_id AND j.state = 'running' AND j.lease_expires_at < now()
RETURNING j.task_id;

-- name: relay_cursor
SELECT xid, seq FROM relay_cursor;

-- name: save_relay_cursor
INSERT INTO relay_cursor (id, xid, seq) VALUES (true, $1, $2)
ON CONFLICT (id) DO UPDATE SET xid = excluded.xid, seq = excluded.seq
 WHERE (relay_cursor.xid, relay_cursor.seq) < (excluded.xid, excluded.seq);

-- name: list_tasks
-- Newest first. $5: the principal's scope patterns as LIKE patterns (NULL: every scope).
SELECT t.id, t.view, t.created_at, e.xid, e.seq
  FROM tasks AS t
  LEFT JOIN events AS e ON e.task_id = t.id AND e.version = t.version
 WHERE ($1::text IS NULL OR t.scope = $1)
   AND ($2::text[] IS NULL OR t.status = ANY ($2))
   AND ($3::text IS NULL OR t.kind = $3)
   AND ($4::text IS NULL OR $4 = ANY (t.labels))
   AND ($5::text[] IS NULL OR t.scope LIKE ANY ($5))
   AND ($6::timestamptz IS NULL OR (t.created_at, t.id) < ($6, $7::text))
 ORDER BY t.created_at DESC, t.id DESC
 LIMIT $8;

-- name: dependency_statuses
SELECT t.id, t.status FROM tasks AS t WHERE t.id = ANY ($1::text[]);

-- name: waiting_on
-- Waiting tasks that depend on any of $1. Each dependant is looked up on its own (LIMIT
-- keeps the lookup from becoming a join): a plan made while `tasks` was small would
-- otherwise join it by a sequential scan, and keep doing so as the table grows.
SELECT DISTINCT d.task_id AS id FROM task_dependencies AS d
 CROSS JOIN LATERAL (SELECT 1 FROM tasks AS t
                      WHERE t.id = d.task_id AND t.status = 'waiting' LIMIT 1) AS waiting
 WHERE d.depends_on = ANY ($1::text[]);

-- name: waiting_tasks
SELECT t.id FROM tasks AS t WHERE t.status = 'waiting' ORDER BY t.created_at LIMIT $1;

-- name: expired_deadlines
-- Active tasks past their timeout whose job nobody holds a live lease on. The timeout is
-- capped at ten years: a larger one (stored before the edge refused it) must not overflow
-- the timestamp and fail the query for every task.
SELECT t.id FROM tasks AS t JOIN jobs AS j ON j.task_id = t.id
 WHERE t.status IN ('queued', 'running', 'retrying', 'waiting_answer', 'waiting')
   AND jsonb_typeof(t.view -> 'timeout_s') = 'number'
   AND (t.view ->> 'deadline_from')::timestamptz
       + make_interval(secs => least((t.view ->> 'timeout_s')::double precision, 315360000)) < now()
   AND (j.state <> 'running' OR j.lease_expires_at < now())
 LIMIT $1;

-- name: prune
-- Trim the history of tasks that ended more than $1 seconds ago, keeping each one's last
-- event (with the view as a snapshot, so its view and position stay readable), and record
-- the newest position trimmed.
WITH old AS (
    UPDATE tasks AS t SET pruned = true
     WHERE t.id IN (SELECT o.id FROM tasks AS o
                     WHERE o.status IN ('completed', 'failed', 'cancelled', 'timed_out')
                       AND NOT o.pruned AND o.updated_at < now() - make_interval(secs => $1)
                     LIMIT $2
                       FOR UPDATE SKIP LOCKED)  -- never waits (the lock order of events/commit.py)
    RETURNING t.id, t.version, t.view
), unneeded AS (
    DELETE FROM task_dependencies AS d USING old WHERE d.task_id = old.id
), kept AS (
    UPDATE events AS e SET snapshot = old.view
      FROM old WHERE e.task_id = old.id AND e.version = old.version
    RETURNING e.task_id
), gone AS (
    DELETE FROM events AS e USING old
     WHERE e.task_id = old.id AND e.version < old.version
    RETURNING e.xid, e.seq
), mark AS (
    INSERT INTO retention AS r (id, xid, seq)
    SELECT true, g.xid, g.seq FROM gone AS g ORDER BY g.xid DESC, g.seq DESC LIMIT 1
    ON CONFLICT (id) DO UPDATE SET xid = excluded.xid, seq = excluded.seq
     WHERE (r.xid, r.seq) < (excluded.xid, excluded.seq)
    RETURNING 1
)
SELECT (SELECT count(*) FROM old) AS tasks, (SELECT count(*) FROM gone) AS events,
       (SELECT count(*) FROM kept) AS kept, (SELECT count(*) FROM mark) AS marked;

-- name: retention_floor
SELECT xid, seq FROM retention;

-- name: task_scopes
-- The scope of each named task that exists (authorization of `depends_on`).
SELECT t.id, t.scope FROM tasks AS t WHERE t.id = ANY ($1::text[]);

-- name: hand_back
-- A draining worker gives back a job it still holds: the fence goes up (its own writes are
-- refused from here on, invariant 3) and the job is queued at once, for another worker to
-- resume at its first unfinished step.
UPDATE jobs AS j
   SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL, fence = j.fence + 1,
       run_at = now()
 WHERE j.task_id = $1 AND j.fence = $2 AND j.state = 'running'
RETURNING j.task_id;

-- name: queue_depth
-- Jobs queued and due, by kind, and how long the oldest has waited (for /metrics).
SELECT j.kind, count(*) AS queued,
       extract(epoch FROM now() - min(j.run_at))::float8 AS oldest_s
  FROM jobs AS j
 WHERE j.state = 'queued' AND j.run_at <= now()
 GROUP BY j.kind;

-- name: remember_trace
INSERT INTO task_traces (task_id, traceparent) VALUES ($1, $2) ON CONFLICT (task_id) DO NOTHING;

-- name: traces
SELECT t.task_id, t.traceparent FROM task_traces AS t WHERE t.task_id = ANY ($1::text[]);

-- name: prune_traces
DELETE FROM task_traces AS t WHERE t.created_at < now() - make_interval(secs => $1);
