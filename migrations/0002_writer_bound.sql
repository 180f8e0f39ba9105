-- taskcast schema v2: a read bound that waits only for taskcast's own writers (invariant 10).
--
-- v1 read below pg_snapshot_xmin(pg_current_snapshot()): the oldest transaction still running
-- anywhere on the server (xids are shared by every database), so one foreign write transaction
-- held back every event committed after it began. Now every transaction that inserts events
-- announces itself, and readers wait only for announced writers:
--
-- * A writer takes the shared transaction-level advisory lock (1952675698 "tcwr", 0) BEFORE
--   its transaction has an xid (taskcast_announce raises otherwise). Shared: writers never
--   wait for each other. It is released at commit or abort.
-- * A reader's bound (events/bound.py) is min(x0, the xid of every backend of this database
--   holding that lock), where x0 is the xmax of a snapshot taken BEFORE the lock holders are
--   read, and the events are then read in a snapshot taken AFTER (another statement).
--
-- Why that order keeps invariant 4: take a writer W whose xid x is below the bound. Then
-- x < x0, so x was assigned before x0 was read, so W held the lock then (it announced before
-- x existed). Had W still been running when the holders were read, x would be among them and
-- the bound would be <= x. So W ended before that read, hence before the reading snapshot:
-- its events are either all visible to the reader or aborted. A writer with no xid yet when
-- the holders are read gets one later, >= x0, hence >= the bound.
-- Foreign transactions (same database or not) take no part in the bound.

CREATE FUNCTION taskcast_announce() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('taskcast.writer', true) = 'on' THEN
        RETURN;  -- announced already, earlier in this transaction
    END IF;
    -- Announcing after the xid exists would leave a window in which a reader's bound passes
    -- this transaction's xid without seeing it: refuse rather than risk a skipped event.
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'a transaction that writes events must announce itself before it writes anything'
            USING ERRCODE = 'TCW01',
                  HINT = 'write events through taskcast_create/taskcast_append first in the transaction';
    END IF;
    PERFORM pg_advisory_xact_lock_shared(1952675698, 0);
    -- Local: reverts at commit, abort, and at the rollback of a savepoint (with the lock).
    PERFORM set_config('taskcast.writer', 'on', true);
END
$$;

-- Every statement that inserts events announces its transaction (or fails), whoever runs it:
-- taskcast's functions announce first anyway; this catches any other INSERT or COPY.
CREATE FUNCTION taskcast_events_announced() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM taskcast_announce();
    RETURN NULL;
END
$$;

CREATE TRIGGER events_announced BEFORE INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION taskcast_events_announced();

-- Taskcast's writers in flight in this database, read live, for the bound (events/bound.py):
-- x0 (the xmax of a snapshot taken first, in the DECLARE, a statement of its own, before
-- pg_locks is read) and one row per backend holding the writers' lock: its pid, its
-- transaction's id (32-bit; NULL until assigned) and age. No writer: one row, pid NULL.
-- backend_xid is cached per transaction, hence the clear; pg_locks is always live.
-- cluster_xmin is the v1 bound, for /metrics only.
-- READ COMMITTED only: under REPEATABLE READ the caller's next read would reuse an old snapshot.
CREATE FUNCTION taskcast_writers()
RETURNS TABLE (x0 xid8, cluster_xmin xid8, pid integer, xid xid, age_s double precision)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_snapshot pg_snapshot := pg_current_snapshot();
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'the read bound needs READ COMMITTED, not %',
            current_setting('transaction_isolation') USING ERRCODE = 'TCW02';
    END IF;
    PERFORM pg_stat_clear_snapshot();
    RETURN QUERY
    SELECT pg_snapshot_xmax(v_snapshot), pg_snapshot_xmin(v_snapshot),
           w.pid, w.backend_xid, w.age_s
      FROM (VALUES (1)) AS one (i)
      LEFT JOIN (
        SELECT a.pid, a.backend_xid,
               extract(epoch FROM clock_timestamp() - a.xact_start)::double precision AS age_s
          FROM pg_locks AS l
          JOIN pg_stat_get_activity(NULL) AS a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.classid = 1952675698 AND l.objid = 0
           AND l.objsubid = 2
           AND l.database = (SELECT d.oid FROM pg_database AS d WHERE d.datname = current_database())
      ) AS w ON true;
END
$$;

-- taskcast_append and taskcast_create as in 0001, announcing first.
CREATE OR REPLACE FUNCTION taskcast_append(
    p_task       text,
    p_expected   integer,
    p_status     text,
    p_view       jsonb,
    p_types      text[],
    p_data       jsonb[],
    p_at         timestamptz[],
    p_fence      bigint,
    p_job_state  text,
    p_run_at     timestamptz,
    p_principal  text,
    p_key        text
) RETURNS TABLE (xid xid8, seq bigint, version integer)
LANGUAGE plpgsql AS $$
DECLARE
    v_scope text;
    v_count integer := cardinality(p_types);
BEGIN
    -- Invariant 10: announce before the UPDATE below assigns this transaction's xid.
    PERFORM taskcast_announce();

    UPDATE tasks AS t
       SET status = p_status, view = p_view, version = p_expected + v_count,
           updated_at = p_at[v_count]
     WHERE t.id = p_task AND t.version = p_expected
     RETURNING t.scope INTO v_scope;
    IF NOT FOUND THEN
        IF EXISTS (SELECT 1 FROM tasks AS t WHERE t.id = p_task) THEN
            RAISE EXCEPTION 'task % is not at version %', p_task, p_expected
                USING ERRCODE = 'TCV01';
        END IF;
        RAISE EXCEPTION 'no task %', p_task USING ERRCODE = 'TCN01';
    END IF;

    IF p_fence IS NOT NULL THEN
        PERFORM 1 FROM jobs AS j
         WHERE j.task_id = p_task AND j.fence = p_fence AND j.state = 'running'
           AND j.lease_expires_at > now()
           FOR SHARE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'fence % of task % is stale', p_fence, p_task
                USING ERRCODE = 'TCF01';
        END IF;
    END IF;

    IF p_job_state = 'cancel' THEN
        UPDATE jobs AS j SET cancel_requested = true WHERE j.task_id = p_task;
        PERFORM pg_notify('taskcast_cancel', p_task);
    ELSIF p_job_state IS NOT NULL THEN
        UPDATE jobs AS j
           SET state = p_job_state,
               run_at = coalesce(p_run_at, now()),
               lease_owner = CASE WHEN p_job_state = 'running' THEN j.lease_owner END,
               lease_expires_at = CASE WHEN p_job_state = 'running' THEN j.lease_expires_at END,
               fence = CASE WHEN p_job_state = 'running' THEN j.fence ELSE j.fence + 1 END,
               cancel_requested = CASE WHEN p_job_state = 'queued' THEN false
                                       ELSE j.cancel_requested END
         WHERE j.task_id = p_task;
        IF p_job_state = 'queued' THEN
            PERFORM pg_notify('taskcast_jobs', '');
        END IF;
    END IF;

    RETURN QUERY
    INSERT INTO events AS e (task_id, version, scope, type, data, at)
    SELECT p_task, p_expected + n.i::integer, v_scope, n.type, p_data[n.i], p_at[n.i]
      FROM unnest(p_types) WITH ORDINALITY AS n (type, i)
     ORDER BY n.i
    RETURNING e.xid, e.seq, e.version;

    IF p_key IS NOT NULL THEN
        PERFORM taskcast_remember_key(p_principal, p_key, p_task, p_status, e.xid, e.seq)
           FROM events AS e WHERE e.task_id = p_task AND e.version = p_expected + v_count;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION taskcast_create(
    p_task       text,
    p_kind       text,
    p_scope      text,
    p_status     text,
    p_view       jsonb,
    p_labels     text[],
    p_priority   integer,
    p_data       jsonb,
    p_at         timestamptz,
    p_job_state  text,
    p_mutex      text,
    p_principal  text,
    p_key        text
) RETURNS TABLE (task text, status text, xid xid8, seq bigint, duplicate boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_xid xid8;
    v_seq bigint;
BEGIN
    -- Invariant 10: announce before the INSERT below assigns this transaction's xid.
    PERFORM taskcast_announce();

    IF p_key IS NOT NULL THEN
        RETURN QUERY
        SELECT k.task_id, k.status, k.xid, k.seq, true FROM command_keys AS k
         WHERE k.principal = p_principal AND k.key = p_key
           AND k.created_at >= now() - interval '24 hours';
        IF FOUND THEN
            RETURN;
        END IF;
    END IF;

    INSERT INTO tasks (id, kind, scope, status, version, view, labels, created_at, updated_at)
    VALUES (p_task, p_kind, p_scope, p_status, 1, p_view, p_labels, p_at, p_at);
    INSERT INTO events AS e (task_id, version, scope, type, data, at)
    VALUES (p_task, 1, p_scope, 'task.created', p_data, p_at)
    RETURNING e.xid, e.seq INTO v_xid, v_seq;

    INSERT INTO jobs (task_id, kind, scope, priority, state, mutex)
    VALUES (p_task, p_kind, p_scope, p_priority, coalesce(p_job_state, 'parked'), p_mutex);
    IF p_job_state = 'queued' THEN
        PERFORM pg_notify('taskcast_jobs', '');
    END IF;

    IF p_key IS NOT NULL THEN
        PERFORM taskcast_remember_key(p_principal, p_key, p_task, p_status, v_xid, v_seq);
    END IF;

    PERFORM pg_notify('taskcast_events', '');
    RETURN QUERY SELECT p_task, p_status, v_xid, v_seq, false;
END
$$;
