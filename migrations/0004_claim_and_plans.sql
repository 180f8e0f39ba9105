-- The claim's update of the jobs it takes goes through the primary key, and the batch
-- functions keep generic plans.
--
-- 0003's claim joined `jobs` with the rows it took (`UPDATE jobs ... FROM taken`), and the
-- planner, which cannot know that `taken` holds at most p_limit rows, hashed them and read
-- the whole `jobs` table, finished jobs included: every claim cost as much as every job
-- kept (20,000 queued: several milliseconds a claim). The rows taken are now looked up by
-- key (`task_id = ANY (...)`), whatever the table holds.
--
-- And its plans are generic, planned once per connection. With PostgreSQL's default plan
-- cache mode a claim took 1.4-1.8 times as long (pg_stat_user_functions, a drain of
-- 8,000 tasks, runs alternated): its statements kept being planned for each call's
-- parameters, which only change the LIMIT. The rest is 0003's function.

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
SET enable_bitmapscan = off SET enable_sort = off SET plan_cache_mode = force_generic_plan
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

-- The batch functions too: their statements take arrays whose sizes do not change the
-- right plan (every table is reached by key). Per call, generic plans cut the server's
-- time of a one-item append by about a third and of a one-item create by about a sixth
-- (pg_stat_user_functions, 500 sequential calls each, modes alternated three times).
ALTER FUNCTION taskcast_append_batch(text[], integer[], text[], jsonb[], bigint[], text[], timestamptz[],
                                     text[], text[], integer[], integer[], text[], jsonb[], timestamptz[])
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION taskcast_create_batch(text[], text[], text[], text[], jsonb[], integer[], jsonb[], timestamptz[],
                                     text[], text[], text[], text[])
    SET plan_cache_mode = force_generic_plan;
