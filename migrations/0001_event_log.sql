-- taskcast schema v1: the event log (truth), the task projection, the job queue,
-- idempotency keys and the relay's cursor.
--
-- A task view's position is that of the event at the task's version (join on events).
-- Positions: an event's position is (xid, seq): the id of the transaction that wrote it and
-- a sequence number. Readers only read rows whose xid is below the snapshot's xmin, so a row
-- that commits later can never appear behind a position a reader has passed (invariant 4).

CREATE TABLE tasks (
    id          text PRIMARY KEY,
    kind        text NOT NULL,
    scope       text NOT NULL,
    status      text NOT NULL,
    version     integer NOT NULL,
    view        jsonb NOT NULL,
    labels      text[] NOT NULL DEFAULT '{}',
    pruned      boolean NOT NULL DEFAULT false,  -- history trimmed by retention
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);
CREATE INDEX tasks_scope_created ON tasks (scope, created_at DESC, id DESC);
CREATE INDEX tasks_created ON tasks (created_at DESC, id DESC);

CREATE TABLE events (
    xid      xid8 NOT NULL DEFAULT pg_current_xact_id(),
    seq      bigint GENERATED ALWAYS AS IDENTITY,
    task_id  text NOT NULL,
    version  integer NOT NULL,
    scope    text NOT NULL,
    type     text NOT NULL,
    data     jsonb NOT NULL,
    at       timestamptz NOT NULL,
    snapshot jsonb,  -- the task view after this event, kept when retention trims what precedes it
    PRIMARY KEY (xid, seq),
    UNIQUE (task_id, version)
);
CREATE INDEX events_scope_position ON events (scope, xid, seq);

-- The queue. One row per task; `fence` goes up on every claim, rescue, timeout and cancel,
-- and every write a worker makes is conditioned on it (invariant 3).
CREATE TABLE jobs (
    task_id           text PRIMARY KEY REFERENCES tasks (id) ON DELETE CASCADE,
    kind              text NOT NULL,
    scope             text NOT NULL,
    priority          integer NOT NULL DEFAULT 0,
    state             text NOT NULL CHECK (state IN ('queued', 'running', 'parked', 'done')),
    run_at            timestamptz NOT NULL DEFAULT now(),
    lease_owner       text,
    lease_expires_at  timestamptz,
    fence             bigint NOT NULL DEFAULT 0,
    attempt           integer NOT NULL DEFAULT 0,
    cancel_requested  boolean NOT NULL DEFAULT false,
    mutex             text  -- jobs sharing a mutex (e.g. one repository) run one at a time
);
CREATE INDEX jobs_ready ON jobs (priority DESC, run_at, task_id) WHERE state = 'queued';
CREATE INDEX jobs_leased ON jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_running_scope ON jobs (scope) WHERE state = 'running';
CREATE INDEX jobs_running_mutex ON jobs (mutex) WHERE state = 'running' AND mutex IS NOT NULL;
CREATE INDEX tasks_waiting_on ON tasks USING gin ((view -> 'depends_on')) WHERE status = 'waiting';

-- Idempotency: the first ack of a command, per principal and key, for 24 hours.
CREATE TABLE command_keys (
    principal   text NOT NULL,
    key         text NOT NULL,
    task_id     text NOT NULL,
    status      text NOT NULL,
    xid         xid8 NOT NULL,
    seq         bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (principal, key)
);

-- Retention trims the history of finished tasks; `since` at or before the newest trimmed
-- position cannot be recovered exactly (PROTOCOL.md: recovered false, current views).
CREATE TABLE retention (
    id    boolean PRIMARY KEY DEFAULT true CHECK (id),
    xid   xid8 NOT NULL,
    seq   bigint NOT NULL
);

CREATE TABLE relay_cursor (
    id    boolean PRIMARY KEY DEFAULT true CHECK (id),
    xid   xid8 NOT NULL,
    seq   bigint NOT NULL
);

-- Record a command's first ack under its idempotency key. A key older than 24 hours is
-- free again; one in use raises TCD01 (the caller reads the first ack instead).
CREATE FUNCTION taskcast_remember_key(
    p_principal text, p_key text, p_task text, p_status text, p_xid xid8, p_seq bigint
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO command_keys AS k (principal, key, task_id, status, xid, seq)
    VALUES (p_principal, p_key, p_task, p_status, p_xid, p_seq)
    ON CONFLICT (principal, key) DO UPDATE
       SET task_id = excluded.task_id, status = excluded.status, xid = excluded.xid,
           seq = excluded.seq, created_at = now()
     WHERE k.created_at < now() - interval '24 hours';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'key % was used already', p_key USING ERRCODE = 'TCD01';
    END IF;
END
$$;

-- Append events to one task in one statement (one round trip, one transaction).
--
-- Order matters. The task row is updated FIRST, so that the transaction's xid is assigned
-- when it takes the task's row lock: two appends to one task then get xids in version order,
-- which keeps positions and versions in the same order for every task (invariant 4).
-- The expected version makes the update optimistic: a mismatch writes nothing (conflict).
-- With a fence, the job row is then locked FOR SHARE and checked: a stale fence or an
-- expired lease raises, and the whole statement (task update included) rolls back
-- (invariant 3). Lock order is always tasks, then jobs, so appends never deadlock.
CREATE FUNCTION taskcast_append(
    p_task       text,
    p_expected   integer,
    p_status     text,
    p_view       jsonb,
    p_types      text[],
    p_data       jsonb[],
    p_at         timestamptz[],
    p_fence      bigint,      -- NULL: not a worker (a command from the gateway)
    p_job_state  text,        -- NULL: leave the job row alone; 'cancel': raise its cancel flag
    p_run_at     timestamptz, -- with p_job_state 'queued': when the job may run
    p_principal  text,        -- with p_key: record the command's ack for idempotency
    p_key        text
) RETURNS TABLE (xid xid8, seq bigint, version integer)
LANGUAGE plpgsql AS $$
DECLARE
    v_scope text;
    v_count integer := cardinality(p_types);
BEGIN
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
        -- The running worker hears of it at once (a hint), or at its next heartbeat.
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
    -- No NOTIFY here: the appender wakes the relay through Redis (events/waker.py).
END
$$;

-- Create a task: its row, its `task.created` event and its job, in one statement.
-- A key seen from the same principal in the last 24 hours returns the first ack instead,
-- and writes nothing (invariant 7).
CREATE FUNCTION taskcast_create(
    p_task       text,
    p_kind       text,
    p_scope      text,
    p_status     text,
    p_view       jsonb,
    p_labels     text[],
    p_priority   integer,
    p_data       jsonb,
    p_at         timestamptz,
    p_job_state  text,       -- 'queued', or NULL when the task waits for dependencies
    p_mutex      text,
    p_principal  text,
    p_key        text
) RETURNS TABLE (task text, status text, xid xid8, seq bigint, duplicate boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_xid xid8;
    v_seq bigint;
BEGIN
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

-- Claim up to p_limit runnable jobs: SKIP LOCKED, so claimers never wait on each other.
-- Fairness is enforced here, under concurrent claims, not by a count read beforehand:
-- a scope's (or mutex's) running jobs are counted while holding a transaction-level
-- advisory lock on it, so two claimers cannot both take its last slot. The lock is only
-- tried: a claimer that finds it busy skips that scope this round (no waiting, no deadlock).
CREATE FUNCTION taskcast_claim(
    p_owner        text,
    p_kinds        text[],
    p_limit        integer,
    p_lease_s      double precision,
    p_scope_limit  integer    -- NULL: no per-scope limit
) RETURNS TABLE (task_id text, fence bigint, attempt integer, cancel_requested boolean,
                 view jsonb, version integer)
LANGUAGE plpgsql AS $$
DECLARE
    c record;
    n integer := 0;
    v_running integer;
BEGIN
    FOR c IN
        SELECT j.task_id, j.scope, j.mutex FROM jobs AS j
         WHERE j.state = 'queued' AND j.run_at <= now() AND j.kind = ANY (p_kinds)
         ORDER BY j.priority DESC, j.run_at, j.task_id
         LIMIT p_limit * 4
           FOR UPDATE SKIP LOCKED
    LOOP
        EXIT WHEN n >= p_limit;
        IF p_scope_limit IS NOT NULL THEN
            CONTINUE WHEN NOT pg_try_advisory_xact_lock(hashtext('taskcast.scope'), hashtext(c.scope));
            SELECT count(*) INTO v_running FROM jobs AS r WHERE r.scope = c.scope AND r.state = 'running';
            CONTINUE WHEN v_running >= p_scope_limit;
        END IF;
        IF c.mutex IS NOT NULL THEN
            CONTINUE WHEN NOT pg_try_advisory_xact_lock(hashtext('taskcast.mutex'), hashtext(c.mutex));
            CONTINUE WHEN EXISTS (SELECT 1 FROM jobs AS r WHERE r.mutex = c.mutex AND r.state = 'running');
        END IF;
        RETURN QUERY
        UPDATE jobs AS j
           SET state = 'running', lease_owner = p_owner,
               lease_expires_at = now() + make_interval(secs => p_lease_s),
               fence = j.fence + 1, attempt = j.attempt + 1
          FROM tasks AS t
         WHERE j.task_id = c.task_id AND t.id = j.task_id
        RETURNING j.task_id, j.fence, j.attempt, j.cancel_requested, t.view, t.version;
        n := n + 1;
    END LOOP;
END
$$;
