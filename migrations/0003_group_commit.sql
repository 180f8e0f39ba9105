-- taskcast schema v3: group commit (events/commit.py).
--
-- taskcast_append_batch appends to many tasks in one statement, one transaction and one
-- commit: a process coalesces the appends of all its tasks while the previous batch is in
-- flight. Each item keeps its own checks (expected version, fence, idempotency key); one
-- that fails them is answered with its outcome and writes nothing, the others commit.
--
-- Lock order, the same for every writer so that none can deadlock another: the rows of
-- `tasks` in id order, then those of `jobs` in id order, then `command_keys`. Writers that
-- take rows in another order (the claim, the rescue, retention) only ever try them
-- (SKIP LOCKED) and so never wait while holding a lock a batch waits for.
--
-- Positions and versions stay in the same order for every task (invariant 4): an item
-- expects the version a committed transaction wrote, read before this batch began, so
-- that transaction's xid is older than this one's; and a later writer of the task expects
-- the version this batch writes, so it begins after this commit.

-- Dependencies get a table of their own. The GIN index on `tasks.view -> 'depends_on'`
-- (partial, on status) made every update of a task touch an index, since both the view and
-- the status change on every event; with no index on a column that changes, updates of
-- `tasks` are HOT (no index is touched), and the free room left on each page
-- (fillfactor) lets them stay on their page.
CREATE TABLE task_dependencies (
    depends_on  text NOT NULL,
    task_id     text NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    PRIMARY KEY (depends_on, task_id)
);
INSERT INTO task_dependencies (depends_on, task_id)
SELECT DISTINCT d.dep, t.id FROM tasks AS t, jsonb_array_elements_text(t.view -> 'depends_on') AS d (dep)
 WHERE jsonb_typeof(t.view -> 'depends_on') = 'array'
ON CONFLICT DO NOTHING;
DROP INDEX tasks_waiting_on;
ALTER TABLE tasks SET (fillfactor = 70);

-- Claim the idempotency keys of the items `p_wanted` marks, in key order (the lock order):
-- for each item, whether its key was used already (in the last 24 hours), so that it is a
-- duplicate and writes nothing. A claimed key's row is given its ack's position once the
-- batch's events are written.
CREATE FUNCTION taskcast_used_keys(
    p_principals text[], p_keys text[], p_tasks text[], p_status text[], p_wanted boolean[]
) RETURNS boolean[]
LANGUAGE sql VOLATILE AS $$
    WITH wanted AS (
        SELECT i.n, i.principal, i.key, i.task, i.status
          FROM unnest(p_keys, p_principals, p_tasks, p_status, p_wanted) WITH ORDINALITY
               AS i (key, principal, task, status, wanted, n)
         WHERE i.key IS NOT NULL AND i.wanted
         ORDER BY i.principal, i.key
    ), claimed AS (
        INSERT INTO command_keys AS k (principal, key, task_id, status, xid, seq)
        SELECT w.principal, w.key, w.task, w.status, pg_current_xact_id(), 0 FROM wanted AS w
        ON CONFLICT (principal, key) DO UPDATE
           SET task_id = excluded.task_id, status = excluded.status, xid = excluded.xid,
               seq = excluded.seq, created_at = now()
         WHERE k.created_at < now() - interval '24 hours'
        RETURNING k.principal, k.key
    )
    SELECT array_agg(w.n IS NOT NULL AND c.key IS NULL ORDER BY o.n)
      FROM generate_subscripts(p_tasks, 1) AS o (n)
      LEFT JOIN wanted AS w ON w.n = o.n
      LEFT JOIN claimed AS c ON c.principal = w.principal AND c.key = w.key
$$;

CREATE FUNCTION taskcast_append_batch(
    p_tasks       text[],         -- one element per item; a task at most once
    p_expected    integer[],      -- the version each item's view is at
    p_status      text[],         -- the task's status after the item
    p_views       jsonb[],        -- the task's view after the item
    p_fences      bigint[],       -- NULL element: a command, no lease to check
    p_job_states  text[],         -- events.model.JobChange, or NULL
    p_run_ats     timestamptz[],
    p_principals  text[],
    p_keys        text[],         -- NULL element: no idempotency key
    p_ev_items    integer[],      -- per event: its item (1-based), in item order
    p_ev_versions integer[],      -- and its version (its item's expected version + 1, + 2, ...)
    p_ev_types    text[],
    p_ev_data     jsonb[],
    p_ev_at       timestamptz[]
) RETURNS TABLE (item integer, outcome text, xid xid8, seq bigint, version integer)
LANGUAGE plpgsql AS $$
-- Few statements, each for the whole batch: a statement's fixed cost is paid per batch.
DECLARE
    v_outcome  text[];
    v_items    integer[];  -- per event written: its item, seq and version
    v_seqs     bigint[];
    v_versions integer[];
BEGIN
    -- Invariant 10: announce before the row locks below assign this transaction's xid.
    IF current_setting('taskcast.writer', true) IS DISTINCT FROM 'on' THEN
        PERFORM taskcast_announce();  -- a check of the setting is cheap, a call is not
    END IF;

    PERFORM 1 FROM tasks AS t WHERE t.id = ANY (p_tasks) ORDER BY t.id FOR UPDATE;
    IF cardinality(array_remove(p_fences, NULL)) > 0 THEN  -- a worker's items, with leases
        PERFORM 1 FROM jobs AS j
         WHERE j.task_id = ANY (SELECT i.task FROM unnest(p_tasks, p_fences) AS i (task, fence)
                                 WHERE i.fence IS NOT NULL)
         ORDER BY j.task_id FOR SHARE;
    END IF;

    -- Each item's checks, on the rows now locked (a new snapshot: this is READ COMMITTED).
    SELECT array_agg(CASE
               WHEN t.id IS NULL THEN 'not_found'
               WHEN t.version <> i.expected THEN 'conflict'
               WHEN i.fence IS NOT NULL AND NOT coalesce(j.fence = i.fence AND j.state = 'running'
                                                         AND j.lease_expires_at > now(), false)
                   THEN 'stale'
               ELSE 'ok' END ORDER BY i.n)
      INTO v_outcome
      FROM unnest(p_tasks, p_expected, p_fences) WITH ORDINALITY AS i (task, expected, fence, n)
      LEFT JOIN tasks AS t ON t.id = i.task
      LEFT JOIN jobs AS j ON j.task_id = i.task AND i.fence IS NOT NULL;

    -- Keys last (lock order); a key used already makes its item a duplicate.
    IF cardinality(array_remove(p_keys, NULL)) > 0 THEN
        SELECT array_agg(CASE WHEN u.used THEN 'duplicate' ELSE v_outcome[u.n] END ORDER BY u.n)
          INTO v_outcome
          FROM unnest(taskcast_used_keys(p_principals, p_keys, p_tasks, p_status,
                                         ARRAY(SELECT o = 'ok' FROM unnest(v_outcome) AS o)))
               WITH ORDINALITY AS u (used, n);
    END IF;

    -- Every write, in one statement. The jobs: a cancel raises the flag for whichever
    -- worker holds the task; any other change moves the job (and, leaving 'running',
    -- raises its fence). The events go in item order, and within an item in order.
    WITH ok AS (
        SELECT i.n, i.task, i.expected, i.status, i.view, i.state, i.run_at, i.principal, i.key,
               t.scope
          FROM unnest(p_tasks, p_expected, p_status, p_views, p_job_states, p_run_ats, p_principals,
                      p_keys) WITH ORDINALITY
               AS i (task, expected, status, view, state, run_at, principal, key, n)
          JOIN tasks AS t ON t.id = i.task
         WHERE v_outcome[i.n] = 'ok'
    ), counts AS (
        SELECT e.item, count(*)::integer AS count, max(e.at) AS at
          FROM unnest(p_ev_items, p_ev_at) AS e (item, at) GROUP BY e.item
    ), moved AS (
        UPDATE tasks AS t
           SET status = ok.status, view = ok.view, version = ok.expected + c.count, updated_at = c.at
          FROM ok JOIN counts AS c ON c.item = ok.n
         WHERE t.id = ok.task
    ), jobbed AS (
        UPDATE jobs AS j
           SET state = CASE WHEN ok.state = 'cancel' THEN j.state ELSE ok.state END,
               run_at = CASE WHEN ok.state = 'cancel' THEN j.run_at ELSE coalesce(ok.run_at, now()) END,
               lease_owner = CASE WHEN ok.state IN ('cancel', 'running') THEN j.lease_owner END,
               lease_expires_at = CASE WHEN ok.state IN ('cancel', 'running') THEN j.lease_expires_at END,
               fence = CASE WHEN ok.state IN ('cancel', 'running') THEN j.fence ELSE j.fence + 1 END,
               cancel_requested = CASE WHEN ok.state = 'cancel' THEN true
                                       WHEN ok.state = 'queued' THEN false
                                       ELSE j.cancel_requested END
          FROM ok
         WHERE j.task_id = ok.task AND ok.state IS NOT NULL
    ), written AS (
        INSERT INTO events AS e (task_id, version, scope, type, data, at)
        SELECT ok.task, e.version, ok.scope, e.type, e.data, e.at
          FROM unnest(p_ev_items, p_ev_versions, p_ev_types, p_ev_data, p_ev_at) WITH ORDINALITY
               AS e (item, version, type, data, at, n)
          JOIN ok ON ok.n = e.item
         ORDER BY e.n
        RETURNING e.task_id, e.seq, e.version
    ), numbered AS (
        SELECT ok.n, ok.principal, ok.key, w.seq, w.version
          FROM written AS w JOIN ok ON ok.task = w.task_id
    ), keyed AS (  -- a key's ack is the position of its item's last event
        UPDATE command_keys AS k SET seq = last.seq
          FROM (SELECT b.principal, b.key, max(b.seq) AS seq FROM numbered AS b
                 WHERE b.key IS NOT NULL GROUP BY b.principal, b.key) AS last
         WHERE k.principal = last.principal AND k.key = last.key
    )
    SELECT array_agg(b.n::integer ORDER BY b.seq), array_agg(b.seq ORDER BY b.seq),
           array_agg(b.version ORDER BY b.seq)
      INTO v_items, v_seqs, v_versions
      FROM numbered AS b;

    -- Wake-ups: one for the whole batch, and a hint only (one for an item that failed its
    -- checks wakes a worker for nothing).
    IF 'cancel' = ANY (p_job_states) THEN
        PERFORM pg_notify('taskcast_cancel', i.task)
           FROM unnest(p_tasks, p_job_states) WITH ORDINALITY AS i (task, state, n)
          WHERE i.state = 'cancel' AND v_outcome[i.n] = 'ok';
    END IF;
    IF 'queued' = ANY (p_job_states) THEN
        PERFORM pg_notify('taskcast_jobs', '');
    END IF;

    RETURN QUERY
    SELECT b.item, 'ok'::text, pg_current_xact_id(), b.seq, b.version
      FROM unnest(v_items, v_seqs, v_versions) AS b (item, seq, version)
    UNION ALL
    SELECT o.n::integer, v_outcome[o.n], NULL::xid8, NULL::bigint, NULL::integer
      FROM generate_subscripts(v_outcome, 1) AS o (n)
     WHERE v_outcome[o.n] <> 'ok';
END
$$;

-- The claim, in one statement for the jobs that need no per-scope limit and no mutex (all
-- of them unless a worker sets a scope limit), and as in 0001, one job at a time, for the
-- others. It announces itself (invariant 10: the worker appends each claimed task's
-- `task.started` in the claim's own transaction, events/queue.py), and it takes each
-- claimed task's row too, only trying it: the claim holds job rows and must not wait for a
-- task row (the lock order above).
CREATE OR REPLACE FUNCTION taskcast_claim(
    p_owner        text,
    p_kinds        text[],
    p_limit        integer,
    p_lease_s      double precision,
    p_scope_limit  integer    -- NULL: no per-scope limit
) RETURNS TABLE (task_id text, fence bigint, attempt integer, cancel_requested boolean,
                 view jsonb, version integer)
LANGUAGE plpgsql
-- The oldest runnable jobs come from the ready index in its own order, a few at a time.
-- Without this the planner, before the first ANALYZE of a young `jobs` table, sorts every
-- queued job to take the first few (a claim then costs as much as the whole queue).
SET enable_bitmapscan = off SET enable_sort = off
AS $$
DECLARE
    v_job record;
    n integer := 0;
    v_running integer;
BEGIN
    IF current_setting('taskcast.writer', true) IS DISTINCT FROM 'on' THEN
        PERFORM taskcast_announce();  -- a check of the setting is cheap, a call is not
    END IF;
    IF p_scope_limit IS NULL THEN
        RETURN QUERY
        WITH candidates AS (
            SELECT j.task_id FROM jobs AS j
             WHERE j.state = 'queued' AND j.run_at <= now() AND j.kind = ANY (p_kinds)
               AND j.mutex IS NULL
             ORDER BY j.priority DESC, j.run_at, j.task_id
             LIMIT p_limit
               FOR UPDATE SKIP LOCKED
        ), taken AS (
            SELECT t.id, t.view, t.version FROM tasks AS t
             WHERE t.id IN (SELECT k.task_id FROM candidates AS k)
               FOR UPDATE SKIP LOCKED  -- a command writing to it: the next round takes it
        )
        UPDATE jobs AS j
           SET state = 'running', lease_owner = p_owner,
               lease_expires_at = now() + make_interval(secs => p_lease_s),
               fence = j.fence + 1, attempt = j.attempt + 1
          FROM taken AS t
         WHERE j.task_id = t.id
        RETURNING j.task_id, j.fence, j.attempt, j.cancel_requested, t.view, t.version;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n >= p_limit THEN
            RETURN;
        END IF;
    END IF;
    FOR v_job IN
        SELECT j.task_id, j.scope, j.mutex FROM jobs AS j
         WHERE j.state = 'queued' AND j.run_at <= now() AND j.kind = ANY (p_kinds)
           AND (p_scope_limit IS NOT NULL OR j.mutex IS NOT NULL)
         ORDER BY j.priority DESC, j.run_at, j.task_id
         LIMIT (p_limit - n) * 4
           FOR UPDATE SKIP LOCKED
    LOOP
        EXIT WHEN n >= p_limit;
        IF p_scope_limit IS NOT NULL THEN
            CONTINUE WHEN NOT pg_try_advisory_xact_lock(hashtext('taskcast.scope'), hashtext(v_job.scope));
            SELECT count(*) INTO v_running FROM jobs AS r WHERE r.scope = v_job.scope AND r.state = 'running';
            CONTINUE WHEN v_running >= p_scope_limit;
        END IF;
        IF v_job.mutex IS NOT NULL THEN
            CONTINUE WHEN NOT pg_try_advisory_xact_lock(hashtext('taskcast.mutex'), hashtext(v_job.mutex));
            CONTINUE WHEN EXISTS (SELECT 1 FROM jobs AS r WHERE r.mutex = v_job.mutex AND r.state = 'running');
        END IF;
        PERFORM 1 FROM tasks AS t WHERE t.id = v_job.task_id FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        RETURN QUERY
        UPDATE jobs AS j
           SET state = 'running', lease_owner = p_owner,
               lease_expires_at = now() + make_interval(secs => p_lease_s),
               fence = j.fence + 1, attempt = j.attempt + 1
          FROM tasks AS t
         WHERE j.task_id = v_job.task_id AND t.id = j.task_id
        RETURNING j.task_id, j.fence, j.attempt, j.cancel_requested, t.view, t.version;
        n := n + 1;
    END LOOP;
END
$$;

-- Create many tasks in one statement (a node's creates, coalesced as the appends are):
-- per item its row, its `task.created` event, its job and its dependencies. An item whose
-- idempotency key was used in the last 24 hours writes nothing and answers the first ack
-- (duplicate true). A key is claimed before anything is written, in key order; a batch
-- racing another for the same key waits for it, then answers its ack.
CREATE FUNCTION taskcast_create_batch(
    p_tasks       text[],
    p_kinds       text[],
    p_scopes      text[],
    p_status      text[],
    p_views       jsonb[],
    p_priorities  integer[],
    p_data        jsonb[],       -- each `task.created`'s data (its labels and depends_on)
    p_at          timestamptz[],
    p_job_states  text[],        -- 'queued', or NULL: parked until its dependencies end
    p_mutexes     text[],
    p_principals  text[],
    p_keys        text[]
) RETURNS TABLE (item integer, task text, status text, xid xid8, seq bigint, duplicate boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_fresh boolean[] := array_fill(true, ARRAY[cardinality(p_tasks)]);
BEGIN
    -- Invariant 10: announce before the first write assigns this transaction's xid.
    IF current_setting('taskcast.writer', true) IS DISTINCT FROM 'on' THEN
        PERFORM taskcast_announce();  -- a check of the setting is cheap, a call is not
    END IF;

    IF cardinality(array_remove(p_keys, NULL)) > 0 THEN
        SELECT array_agg(NOT u.used ORDER BY u.n) INTO v_fresh
          FROM unnest(taskcast_used_keys(p_principals, p_keys, p_tasks, p_status, v_fresh))
               WITH ORDINALITY AS u (used, n);
    END IF;

    -- Every write, in one statement.
    RETURN QUERY
    WITH fresh AS (
        SELECT i.n, i.task, i.kind, i.scope, i.status, i.view, i.priority, i.data, i.at, i.state,
               i.mutex, i.principal, i.key
          FROM unnest(p_tasks, p_kinds, p_scopes, p_status, p_views, p_priorities, p_data, p_at,
                      p_job_states, p_mutexes, p_principals, p_keys) WITH ORDINALITY
               AS i (task, kind, scope, status, view, priority, data, at, state, mutex, principal,
                     key, n)
         WHERE v_fresh[i.n]
    ), rows AS (
        INSERT INTO tasks (id, kind, scope, status, version, view, labels, created_at, updated_at)
        SELECT f.task, f.kind, f.scope, f.status, 1, f.view,
               ARRAY(SELECT jsonb_array_elements_text(f.data -> 'labels')), f.at, f.at
          FROM fresh AS f
        RETURNING id
    ), queued AS (
        INSERT INTO jobs (task_id, kind, scope, priority, state, mutex)
        SELECT r.id, f.kind, f.scope, f.priority, coalesce(f.state, 'parked'), f.mutex
          FROM rows AS r JOIN fresh AS f ON f.task = r.id
    ), needs AS (
        INSERT INTO task_dependencies (depends_on, task_id)
        SELECT DISTINCT d.dep, r.id
          FROM rows AS r JOIN fresh AS f ON f.task = r.id,
               jsonb_array_elements_text(f.data -> 'depends_on') AS d (dep)
         WHERE jsonb_typeof(f.data -> 'depends_on') = 'array'
    ), written AS (
        INSERT INTO events AS e (task_id, version, scope, type, data, at)
        SELECT f.task, 1, f.scope, 'task.created', f.data, f.at FROM fresh AS f ORDER BY f.n
        RETURNING e.task_id, e.xid, e.seq
    ), keyed AS (
        UPDATE command_keys AS k SET seq = w.seq
          FROM written AS w JOIN fresh AS f ON f.task = w.task_id
         WHERE f.key IS NOT NULL AND k.principal = f.principal AND k.key = f.key
    )
    SELECT f.n::integer, f.task, f.status, w.xid, w.seq, false
      FROM fresh AS f JOIN written AS w ON w.task_id = f.task
    UNION ALL
    SELECT i.n::integer, k.task_id, k.status, k.xid, k.seq, true
      FROM unnest(p_principals, p_keys) WITH ORDINALITY AS i (principal, key, n)
      JOIN command_keys AS k ON k.principal = i.principal AND k.key = i.key
     WHERE NOT v_fresh[i.n];

    -- One wake-up of each kind for the whole batch (hints: one too many is harmless).
    IF 'queued' = ANY (p_job_states) THEN
        PERFORM pg_notify('taskcast_jobs', '');
    END IF;
    IF true = ANY (v_fresh) THEN
        PERFORM pg_notify('taskcast_events', '');
    END IF;
END
$$;

-- The trigger as in 0002, but an announced transaction (every batch) pays only the check.
CREATE OR REPLACE FUNCTION taskcast_events_announced() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('taskcast.writer', true) IS DISTINCT FROM 'on' THEN
        PERFORM taskcast_announce();
    END IF;
    RETURN NULL;
END
$$;

-- Every write now goes through the batch functions.
DROP FUNCTION taskcast_append(text, integer, text, jsonb, text[], jsonb[], timestamptz[], bigint, text,
                              timestamptz, text, text);
DROP FUNCTION taskcast_create(text, text, text, text, jsonb, text[], integer, jsonb, timestamptz, text,
                              text, text, text);
