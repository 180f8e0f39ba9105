-- The batch functions in time linear in the batch: no join between two of their own sets.
--
-- Their statements run generic plans (0004), which estimate an unnest at 10 rows and a
-- filtered one at 1, so every join between two of a function's own sets (unnested
-- arguments, CTEs) was a nested loop: each row of one set scanned the whole of the other.
-- In taskcast_append_batch the join of the written events with the items (wide rows: each
-- carries its view) took 6 of a 64-item batch's 8 ms (auto_explain, a drain of 20,000
-- one-step tasks), and the cost grew with the square of the batch. Here an item's values
-- are reached by subscript instead (a PL/pgSQL array argument or variable is stored
-- expanded: a subscript costs the same whatever the index), a row's item or position by key
-- in a jsonb object, or by the caller (taskcast_append_batch's new form answers each event's
-- task and version). The joins left go to a table by its primary key.
--
-- And the claim reads only jobs of the kinds it asks for. Its one ready index ordered every
-- queued job by priority, whatever its kind: a claim of the kinds with a cap of their own
-- (events/worker.py) walked past every queued job of other kinds to find none (4.6 ms per
-- claim behind 20,000 queued `demo` jobs), and so did the search for jobs with a mutex
-- whenever a claim came back short.

-- A new signature beside 0003's, which stays for the processes of the previous release that
-- run on while a deploy replaces them (`taskcast migrate` first, then the processes): every
-- other function keeps its signature and its answers. A later migration drops the old one.
CREATE FUNCTION taskcast_append_batch(
    p_tasks       text[],         -- one element per item; a task at most once
    p_expected    integer[],      -- the version each item's view is at
    p_status      text[],         -- the task's status after the item
    p_views       jsonb[],        -- the task's view after the item
    p_versions    integer[],      -- and its version (that of the item's last event)
    p_at          timestamptz[],  -- the item's time: each of its events is at it
    p_fences      bigint[],       -- NULL element: a command, no lease to check
    p_job_states  text[],         -- events.model.JobChange, or NULL
    p_run_ats     timestamptz[],
    p_principals  text[],
    p_keys        text[],         -- NULL element: no idempotency key
    p_ev_items    integer[],      -- per event: its item (1-based), in item order
    p_ev_versions integer[],      -- and its version (its item's expected version + 1, + 2, ...)
    p_ev_types    text[],
    p_ev_data     jsonb[]
) RETURNS TABLE (item integer, outcome text, task text, xid xid8, seq bigint, version integer)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
-- Few statements, each for the whole batch: a statement's fixed cost is paid per batch.
-- A row per event written (item NULL: the caller knows it by task), then one per item
-- that failed its checks (task NULL).
DECLARE
    v_outcome  text[];
    v_scopes   text[];
    v_tasks    text[];  -- per event written: its task, seq and version
    v_seqs     bigint[];
    v_versions integer[];
    v_last     jsonb;   -- {task: seq of its last event}, for the keys
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
               ELSE 'ok' END ORDER BY i.n),
           array_agg(t.scope ORDER BY i.n)
      INTO v_outcome, v_scopes
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
    WITH moved AS (
        UPDATE tasks AS t
           SET status = i.status, view = i.view, version = i.version, updated_at = i.at
          FROM unnest(p_tasks, p_expected, p_status, p_views, p_versions, p_at) WITH ORDINALITY
               AS i (task, expected, status, view, version, at, n)
         WHERE t.id = i.task AND v_outcome[i.n] = 'ok'
           AND i.version > i.expected  -- an item without events leaves its task as it is (0003)
    ), jobbed AS (
        UPDATE jobs AS j
           SET state = CASE WHEN i.state = 'cancel' THEN j.state ELSE i.state END,
               run_at = CASE WHEN i.state = 'cancel' THEN j.run_at ELSE coalesce(i.run_at, now()) END,
               lease_owner = CASE WHEN i.state IN ('cancel', 'running') THEN j.lease_owner END,
               lease_expires_at = CASE WHEN i.state IN ('cancel', 'running') THEN j.lease_expires_at END,
               fence = CASE WHEN i.state IN ('cancel', 'running') THEN j.fence ELSE j.fence + 1 END,
               cancel_requested = CASE WHEN i.state = 'cancel' THEN true
                                       WHEN i.state = 'queued' THEN false
                                       ELSE j.cancel_requested END
          FROM unnest(p_tasks, p_job_states, p_run_ats) WITH ORDINALITY AS i (task, state, run_at, n)
         WHERE j.task_id = i.task AND i.state IS NOT NULL AND v_outcome[i.n] = 'ok'
    ), written AS (
        INSERT INTO events AS e (task_id, version, scope, type, data, at)
        SELECT p_tasks[e.item], e.version, v_scopes[e.item], e.type, e.data, p_at[e.item]
          FROM unnest(p_ev_items, p_ev_versions, p_ev_types, p_ev_data) WITH ORDINALITY
               AS e (item, version, type, data, n)
         WHERE v_outcome[e.item] = 'ok'
         ORDER BY e.n
        RETURNING e.task_id, e.seq, e.version
    )
    SELECT array_agg(w.task_id), array_agg(w.seq), array_agg(w.version)
      INTO v_tasks, v_seqs, v_versions
      FROM written AS w;

    RETURN QUERY
    SELECT NULL::integer, 'ok'::text, w.task, pg_current_xact_id(), w.seq, w.version
      FROM unnest(v_tasks, v_seqs, v_versions) AS w (task, seq, version)
    UNION ALL
    SELECT o.n::integer, v_outcome[o.n], NULL::text, NULL::xid8, NULL::bigint, NULL::integer
      FROM generate_subscripts(v_outcome, 1) AS o (n)
     WHERE v_outcome[o.n] <> 'ok';

    -- A key's ack is the position of its item's last event.
    IF cardinality(array_remove(p_keys, NULL)) > 0 THEN
        SELECT jsonb_object_agg(l.task, l.seq) INTO v_last
          FROM (SELECT w.task, max(w.seq) AS seq FROM unnest(v_tasks, v_seqs) AS w (task, seq)
                 GROUP BY w.task) AS l;
        UPDATE command_keys AS k SET seq = (v_last ->> i.task)::bigint
          FROM unnest(p_principals, p_keys, p_tasks) WITH ORDINALITY AS i (principal, key, task, n)
         WHERE i.key IS NOT NULL AND v_outcome[i.n] = 'ok' AND v_last ? i.task  -- (it wrote events)
           AND k.principal = i.principal AND k.key = i.key;
    END IF;

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
END
$$;

-- The queued jobs of each kind in claim order, and apart those with a mutex (few or none).
-- Built before the old index is dropped: the builds block writes to `jobs` until this
-- migration commits (reads go on), the drop blocks reads too, so it comes last.
CREATE INDEX jobs_ready_by_kind ON jobs (kind, priority DESC, run_at, task_id) WHERE state = 'queued';
CREATE INDEX jobs_ready_mutex ON jobs (kind, priority DESC, run_at, task_id)
    WHERE state = 'queued' AND mutex IS NOT NULL;
DROP INDEX jobs_ready;

-- As in 0004, with each kind's jobs read from its own part of the index, in claim order.
-- The jobs without a mutex: first, read without locks, the claim's share of each kind
-- (how many of the first `p_limit` jobs of all its kinds, by priority then age, are of
-- that kind); then each kind's share is locked, SKIP LOCKED going on past jobs another
-- claim holds, as one ordered scan did. So a claim locks no more than it takes, and a
-- claim of one kind reads its part of the index once. Those with a mutex, or all of them
-- under a per-scope limit, are then tried one at a time, in claim order, each locked just
-- before it is tried.
CREATE OR REPLACE FUNCTION taskcast_claim(
    p_owner        text,
    p_kinds        text[],
    p_limit        integer,
    p_lease_s      double precision,
    p_scope_limit  integer    -- NULL: no per-scope limit
) RETURNS TABLE (task_id text, fence bigint, attempt integer, cancel_requested boolean,
                 view jsonb, version integer)
LANGUAGE plpgsql
-- The sort that merges the kinds' candidates is small, but with sorts disabled it costs
-- 10^10: that cost alone would have PostgreSQL compile the plan (JIT, ~200 ms a claim).
SET enable_bitmapscan = off SET enable_sort = off SET jit = off SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_kinds text[] := ARRAY(SELECT DISTINCT k FROM unnest(p_kinds) AS k);
    v_job record;
    n integer := 0;
    v_running integer;
BEGIN
    IF current_setting('taskcast.writer', true) IS DISTINCT FROM 'on' THEN
        PERFORM taskcast_announce();  -- a check of the setting is cheap, a call is not
    END IF;
    IF p_scope_limit IS NULL THEN
        RETURN QUERY
        WITH shares AS (
            SELECT v_kinds[1] AS kind, p_limit AS n WHERE cardinality(v_kinds) = 1
            UNION ALL
            SELECT c.kind, count(*)::integer
              FROM (SELECT c.kind
                      FROM unnest(v_kinds) AS k (kind)
                      CROSS JOIN LATERAL (
                          SELECT j.kind, j.priority, j.run_at, j.task_id FROM jobs AS j
                           WHERE j.state = 'queued' AND j.kind = k.kind AND j.run_at <= now()
                             AND j.mutex IS NULL
                           ORDER BY j.priority DESC, j.run_at, j.task_id
                           LIMIT p_limit) AS c
                     WHERE cardinality(v_kinds) > 1
                     ORDER BY c.priority DESC, c.run_at, c.task_id
                     LIMIT p_limit) AS c
             GROUP BY c.kind
        ), candidates AS (
            SELECT c.task_id
              FROM shares AS s
              CROSS JOIN LATERAL (
                  SELECT j.task_id FROM jobs AS j
                   WHERE j.state = 'queued' AND j.kind = s.kind AND j.run_at <= now()
                     AND j.mutex IS NULL
                   ORDER BY j.priority DESC, j.run_at, j.task_id
                   LIMIT s.n
                     FOR UPDATE SKIP LOCKED) AS c
        ), taken AS (
            SELECT t.id, t.view, t.version FROM tasks AS t
             WHERE t.id IN (SELECT k.task_id FROM candidates AS k)
               FOR UPDATE SKIP LOCKED  -- a command writing to it: the next round takes it
        ), moved AS (
            UPDATE jobs AS j
               SET state = 'running', lease_owner = p_owner,
                   lease_expires_at = now() + make_interval(secs => p_lease_s),
                   fence = j.fence + 1, attempt = j.attempt + 1
             WHERE j.task_id = ANY (ARRAY(SELECT t.id FROM taken AS t))
            RETURNING j.task_id, j.fence, j.attempt, j.cancel_requested
        )
        SELECT m.task_id, m.fence, m.attempt, m.cancel_requested, t.view, t.version
          FROM moved AS m JOIN taken AS t ON t.id = m.task_id;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n >= p_limit THEN
            RETURN;
        END IF;
    END IF;
    FOR v_job IN
        SELECT c.task_id, c.scope, c.mutex
          FROM (SELECT c.*
                  FROM unnest(v_kinds) AS k (kind)
                  CROSS JOIN LATERAL (  -- those with a mutex (their own index)
                      SELECT j.task_id, j.scope, j.mutex, j.priority, j.run_at FROM jobs AS j
                       WHERE j.state = 'queued' AND j.kind = k.kind AND j.run_at <= now()
                         AND j.mutex IS NOT NULL
                       ORDER BY j.priority DESC, j.run_at, j.task_id
                       LIMIT (p_limit - n) * 4) AS c
                 WHERE p_scope_limit IS NULL
                UNION ALL
                SELECT c.*
                  FROM unnest(v_kinds) AS k (kind)
                  CROSS JOIN LATERAL (  -- every job, against its scope's limit
                      SELECT j.task_id, j.scope, j.mutex, j.priority, j.run_at FROM jobs AS j
                       WHERE j.state = 'queued' AND j.kind = k.kind AND j.run_at <= now()
                       ORDER BY j.priority DESC, j.run_at, j.task_id
                       LIMIT (p_limit - n) * 4) AS c
                 WHERE p_scope_limit IS NOT NULL) AS c
         ORDER BY c.priority DESC, c.run_at, c.task_id
         LIMIT (p_limit - n) * 4
    LOOP
        EXIT WHEN n >= p_limit;
        -- Locked as 0004's loop locked it, as its turn comes (another claim may hold it, or
        -- have taken it since it was read).
        PERFORM 1 FROM jobs AS j
         WHERE j.task_id = v_job.task_id AND j.state = 'queued' AND j.run_at <= now()
           FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
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

-- The claim and its starts (0006), with each claimed task's new view computed by position
-- and its position found by key.
CREATE OR REPLACE FUNCTION taskcast_claim_start(
    p_owner        text,
    p_kinds        text[],
    p_limit        integer,
    p_lease_s      double precision,
    p_scope_limit  integer,
    p_more_kinds   text[] DEFAULT '{}',
    p_more_limit   integer DEFAULT 0
) RETURNS TABLE (task_id text, fence bigint, attempt integer, cancel_requested boolean,
                 view jsonb, version integer, xid xid8, seq bigint)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    -- The protocol's timestamp form (events/clock.py: milliseconds, truncated, `Z`).
    v_stamp text := to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"');
    v_tasks text[];
    v_fences bigint[];
    v_attempts integer[];
    v_cancels boolean[];
    v_views jsonb[];
    v_versions integer[];
    v_starts boolean[];
    v_seqs jsonb;  -- {task: seq of its task.started}
BEGIN
    -- Nothing due, nothing announced (0006).
    IF NOT EXISTS (SELECT 1 FROM jobs AS j
                    WHERE j.state = 'queued' AND j.kind = ANY (p_kinds || p_more_kinds)
                      AND j.run_at <= now()) THEN
        RETURN;
    END IF;
    -- Invariant 10: announced before the claim's row locks assign the transaction's xid.
    IF current_setting('taskcast.writer', true) IS DISTINCT FROM 'on' THEN
        PERFORM taskcast_announce();
    END IF;
    -- The claim first, in a statement of its own: the start below must see, in a snapshot
    -- of its own, every task the claim took (one created while the claim ran included).
    SELECT array_agg(c.task_id), array_agg(c.fence), array_agg(c.attempt),
           array_agg(c.cancel_requested), array_agg(c.view), array_agg(c.version)
      INTO v_tasks, v_fences, v_attempts, v_cancels, v_views, v_versions
      FROM (SELECT * FROM taskcast_claim(p_owner, p_kinds, p_limit, p_lease_s, p_scope_limit)
            UNION ALL  -- Append: the first claim runs to its end before the second begins
            SELECT * FROM taskcast_claim(p_owner, p_more_kinds, p_more_limit, p_lease_s, p_scope_limit)
             WHERE p_more_limit > 0) AS c;
    IF v_tasks IS NULL THEN
        RETURN;
    END IF;
    -- A task that was queued or retrying starts now (the fold of `task.started`,
    -- events/fold.py); one rescued runs on.
    SELECT array_agg(s.starts ORDER BY s.n),
           array_agg(CASE WHEN s.starts
                          THEN s.view || jsonb_build_object('status', 'running', 'version', s.version + 1,
                                                            'updated_at', v_stamp, 'started_at', v_stamp)
                          ELSE s.view END ORDER BY s.n),
           array_agg(s.version + s.starts::integer ORDER BY s.n)
      INTO v_starts, v_views, v_versions
      FROM (SELECT c.n, c.view, c.version, c.view ->> 'status' IN ('queued', 'retrying') AS starts
              FROM unnest(v_views, v_versions) WITH ORDINALITY AS c (view, version, n)) AS s;
    WITH moved AS (
        UPDATE tasks AS t
           SET status = 'running', view = c.view, version = c.version, updated_at = now()
          FROM unnest(v_tasks, v_views, v_versions, v_starts) AS c (task_id, view, version, starts)
         WHERE t.id = c.task_id AND c.starts
    ), written AS (
        INSERT INTO events AS e (task_id, version, scope, type, data, at)
        SELECT c.task_id, c.version, c.view ->> 'scope', 'task.started',
               jsonb_build_object('worker', p_owner, 'attempt', coalesce(c.view -> 'attempt', '1'::jsonb)),
               now()
          FROM unnest(v_tasks, v_views, v_versions, v_starts) AS c (task_id, view, version, starts)
         WHERE c.starts
         ORDER BY c.task_id
        RETURNING e.task_id, e.seq
    )
    SELECT jsonb_object_agg(w.task_id, w.seq) INTO v_seqs FROM written AS w;
    RETURN QUERY
    SELECT c.task_id, c.fence, c.attempt, c.cancel_requested, c.view, c.version,
           CASE WHEN c.starts THEN pg_current_xact_id() END, (v_seqs ->> c.task_id)::bigint
      FROM unnest(v_tasks, v_fences, v_attempts, v_cancels, v_views, v_versions, v_starts)
           AS c (task_id, fence, attempt, cancel_requested, view, version, starts);
END
$$;

-- Each item's key: used already (true) or now claimed for it (false); false too for an item
-- without a key or not wanted. As in 0003, with the claimed keys found by key in a jsonb
-- object rather than joined to the items.
CREATE OR REPLACE FUNCTION taskcast_used_keys(
    p_principals text[], p_keys text[], p_tasks text[], p_status text[], p_wanted boolean[]
) RETURNS boolean[]
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_claimed jsonb;  -- {[principal, key] as text: true}
BEGIN
    WITH claimed AS (
        INSERT INTO command_keys AS k (principal, key, task_id, status, xid, seq)
        SELECT i.principal, i.key, i.task, i.status, pg_current_xact_id(), 0
          FROM unnest(p_keys, p_principals, p_tasks, p_status, p_wanted)
               AS i (key, principal, task, status, wanted)
         WHERE i.key IS NOT NULL AND i.wanted
         ORDER BY i.principal, i.key  -- the lock order of keys
        ON CONFLICT (principal, key) DO UPDATE
           SET task_id = excluded.task_id, status = excluded.status, xid = excluded.xid,
               seq = excluded.seq, created_at = now()
         WHERE k.created_at < now() - interval '24 hours'
        RETURNING k.principal, k.key
    )
    SELECT jsonb_object_agg(jsonb_build_array(c.principal, c.key)::text, true) INTO v_claimed
      FROM claimed AS c;
    RETURN ARRAY(
        SELECT i.key IS NOT NULL AND i.wanted
               AND NOT coalesce(v_claimed ? jsonb_build_array(i.principal, i.key)::text, false)
          FROM unnest(p_keys, p_principals, p_wanted) WITH ORDINALITY AS i (key, principal, wanted, n)
         ORDER BY i.n);
END
$$;

-- The creates as in 0003 (the same arguments and answers), each insert reading the items
-- once, and each created task's item found by key.
CREATE OR REPLACE FUNCTION taskcast_create_batch(
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
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_fresh   boolean[] := array_fill(true, ARRAY[cardinality(p_tasks)]);
    v_tasks   text[];  -- per task created: its id and its `task.created`'s seq
    v_seqs    bigint[];
    v_items   jsonb;   -- {task: its item}
    v_created jsonb;   -- {task: seq}, for the keys
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
    WITH fresh AS (
        SELECT i.n, i.task, i.kind, i.scope, i.status, i.view, i.priority, i.data, i.at, i.state,
               i.mutex
          FROM unnest(p_tasks, p_kinds, p_scopes, p_status, p_views, p_priorities, p_data, p_at,
                      p_job_states, p_mutexes) WITH ORDINALITY
               AS i (task, kind, scope, status, view, priority, data, at, state, mutex, n)
         WHERE v_fresh[i.n]
    ), rows AS (
        INSERT INTO tasks (id, kind, scope, status, version, view, labels, created_at, updated_at)
        SELECT f.task, f.kind, f.scope, f.status, 1, f.view,
               ARRAY(SELECT jsonb_array_elements_text(f.data -> 'labels')), f.at, f.at
          FROM fresh AS f
    ), queued AS (  -- its task's row is checked at the statement's end (the foreign key)
        INSERT INTO jobs (task_id, kind, scope, priority, state, mutex)
        SELECT f.task, f.kind, f.scope, f.priority, coalesce(f.state, 'parked'), f.mutex
          FROM fresh AS f
    ), needs AS (
        INSERT INTO task_dependencies (depends_on, task_id)
        SELECT DISTINCT d.dep, f.task
          FROM fresh AS f, jsonb_array_elements_text(f.data -> 'depends_on') AS d (dep)
         WHERE jsonb_typeof(f.data -> 'depends_on') = 'array'
    ), written AS (
        INSERT INTO events AS e (task_id, version, scope, type, data, at)
        SELECT f.task, 1, f.scope, 'task.created', f.data, f.at FROM fresh AS f ORDER BY f.n
        RETURNING e.task_id, e.seq
    )
    SELECT array_agg(w.task_id), array_agg(w.seq) INTO v_tasks, v_seqs FROM written AS w;
    SELECT jsonb_object_agg(i.task, i.n) INTO v_items
      FROM unnest(p_tasks) WITH ORDINALITY AS i (task, n);

    RETURN QUERY
    SELECT (v_items ->> w.task)::integer, w.task, p_status[(v_items ->> w.task)::integer],
           pg_current_xact_id(), w.seq, false
      FROM unnest(v_tasks, v_seqs) AS w (task, seq)
    UNION ALL
    SELECT i.n::integer, k.task_id, k.status, k.xid, k.seq, true
      FROM unnest(p_principals, p_keys) WITH ORDINALITY AS i (principal, key, n)
      JOIN command_keys AS k ON k.principal = i.principal AND k.key = i.key
     WHERE NOT v_fresh[i.n];

    -- A claimed key's ack: its task's `task.created`.
    IF cardinality(array_remove(p_keys, NULL)) > 0 THEN
        SELECT jsonb_object_agg(w.task, w.seq) INTO v_created
          FROM unnest(v_tasks, v_seqs) AS w (task, seq);
        UPDATE command_keys AS k SET seq = (v_created ->> i.task)::bigint
          FROM unnest(p_principals, p_keys, p_tasks) WITH ORDINALITY AS i (principal, key, task, n)
         WHERE i.key IS NOT NULL AND v_fresh[i.n]
           AND k.principal = i.principal AND k.key = i.key;
    END IF;

    -- One wake-up of each kind for the whole batch (hints: one too many is harmless).
    IF 'queued' = ANY (p_job_states) THEN
        PERFORM pg_notify('taskcast_jobs', '');
    END IF;
    IF true = ANY (v_fresh) THEN
        PERFORM pg_notify('taskcast_events', '');
    END IF;
END
$$;
