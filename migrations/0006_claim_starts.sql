-- The claim starts what it takes in the same statement: one round trip, not four.
--
-- Until now the worker claimed in a transaction of its own (BEGIN; taskcast_claim; then
-- each claimed task's `task.started` through taskcast_append_batch, folded in Python;
-- COMMIT): four round trips per claim, and every claimed view sent to the database and
-- back. `task.started` folds trivially (the status becomes `running`, `version`,
-- `updated_at` and `started_at` move; events/fold.py), so the claim now writes it itself:
-- the claim and its starts are still one commit, and the worker runs one statement.
-- tests/events/test_commit.py checks this fold against events/fold.py's.

CREATE FUNCTION taskcast_claim_start(
    p_owner        text,
    p_kinds        text[],
    p_limit        integer,
    p_lease_s      double precision,
    p_scope_limit  integer,   -- NULL: no per-scope limit
    -- And up to p_more_limit jobs of p_more_kinds, claimed after: the worker's kinds with
    -- a cap of their own (events/worker.py, Slots), whose room is smaller.
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
BEGIN
    -- Nothing due, nothing announced. An empty claim (two lanes per worker, every worker
    -- woken by every create: most claims are) would otherwise hold the readers' bound
    -- (events/bound.py) until it ends, holding back the events others just committed,
    -- while its own end wakes no reader: their delivery waited for the relay's next poll.
    IF NOT EXISTS (SELECT 1 FROM jobs AS j
                    WHERE j.state = 'queued' AND j.run_at <= now()
                      AND (j.kind = ANY (p_kinds) OR j.kind = ANY (p_more_kinds))) THEN
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
    RETURN QUERY
    WITH claimed AS (
        SELECT c.task_id, c.fence, c.attempt, c.cancel_requested, c.view, c.version
          FROM unnest(v_tasks, v_fences, v_attempts, v_cancels, v_views, v_versions)
               AS c (task_id, fence, attempt, cancel_requested, view, version)
    ), starting AS (  -- a task that was queued or retrying starts now; one rescued runs on
        SELECT c.task_id, c.version + 1 AS version, t.scope,
               c.view || jsonb_build_object('status', 'running', 'version', c.version + 1,
                                            'updated_at', v_stamp, 'started_at', v_stamp) AS view,
               jsonb_build_object('worker', p_owner,
                                  'attempt', coalesce(c.view -> 'attempt', '1'::jsonb)) AS data
          FROM claimed AS c JOIN tasks AS t ON t.id = c.task_id
         WHERE c.view ->> 'status' IN ('queued', 'retrying')
    ), moved AS (
        UPDATE tasks AS t
           SET status = 'running', view = s.view, version = s.version, updated_at = now()
          FROM starting AS s
         WHERE t.id = s.task_id
    ), written AS (
        INSERT INTO events AS e (task_id, version, scope, type, data, at)
        SELECT s.task_id, s.version, s.scope, 'task.started', s.data, now()
          FROM starting AS s
         ORDER BY s.task_id
        RETURNING e.task_id, e.seq
    )
    SELECT c.task_id, c.fence, c.attempt, c.cancel_requested,
           coalesce(s.view, c.view), coalesce(s.version, c.version),
           CASE WHEN w.seq IS NOT NULL THEN pg_current_xact_id() END, w.seq
      FROM claimed AS c
      LEFT JOIN starting AS s ON s.task_id = c.task_id
      LEFT JOIN written AS w ON w.task_id = c.task_id;
END
$$;
