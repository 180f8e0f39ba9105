-- A read after a position in one round trip: the bound, then the events below it.
--
-- Until now a reader (the relay on every wake-up, a node filling a gap, a resuming client)
-- sent two statements: taskcast_writers() for the bound (events/bound.py), then the read,
-- in a snapshot taken after it (0002's proof of invariant 4 needs that order). A PL/pgSQL
-- function declared VOLATILE takes a fresh snapshot for each statement it runs, under READ
-- COMMITTED, so the two statements keep their order inside one call: the bound's statement
-- first (its snapshot gives x0, then the writers are read live), then the events' in a
-- snapshot taken after. taskcast_writers() refuses any other isolation level (TCW02).
--
-- The bound is computed as events/bound.py computes it: min(x0, each writer's transaction
-- id widened to xid8 as the nearest one to x0), so the two stay interchangeable.

-- events.bound.widen: the xid8 of the 32-bit `p_xid`, the nearest one to `p_near` (a tie
-- goes below). `p_near` is less than 2^31 from it (see widen's docstring for why).
CREATE FUNCTION taskcast_widen(p_xid xid, p_near xid8) RETURNS xid8
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT (p_near::text::numeric + CASE WHEN d.delta >= 2147483648 THEN d.delta - 4294967296
                                         ELSE d.delta END)::text::xid8
      FROM (SELECT ((p_xid::text::numeric - p_near::text::numeric) % 4294967296 + 4294967296)
                   % 4294967296 AS delta) AS d
$$;

CREATE FUNCTION taskcast_read_after(
    p_xid    xid8,
    p_seq    bigint,
    p_limit  integer,
    p_task   text DEFAULT NULL,  -- one task's events, in version order
    p_scope  text DEFAULT NULL   -- one scope's events
) RETURNS TABLE (xid xid8, seq bigint, task_id text, version integer, scope text, type text,
                 data jsonb, at timestamptz)
-- VOLATILE is what keeps invariant 4: a STABLE function's statements would all share the
-- calling statement's snapshot, older than the bound (tests/events/test_migrate.py checks it).
LANGUAGE plpgsql VOLATILE
-- By index at any size of `events` (0008), and no JIT for the disabled scan's cost.
SET enable_seqscan = off SET jit = off AS $$
DECLARE
    v_bound xid8;
BEGIN
    SELECT least(min(w.x0), min(taskcast_widen(w.xid, w.x0))) INTO v_bound
      FROM taskcast_writers() AS w;  -- one row per writer, x0 on each; xid NULL: none yet
    IF p_task IS NOT NULL THEN
        RETURN QUERY
        SELECT e.xid, e.seq, e.task_id, e.version, e.scope, e.type, e.data, e.at
          FROM events AS e
         WHERE e.task_id = p_task AND (e.xid, e.seq) > (p_xid, p_seq) AND e.xid < v_bound
         ORDER BY e.version
         LIMIT p_limit;
    ELSIF p_scope IS NOT NULL THEN
        RETURN QUERY
        SELECT e.xid, e.seq, e.task_id, e.version, e.scope, e.type, e.data, e.at
          FROM events AS e
         WHERE e.scope = p_scope AND (e.xid, e.seq) > (p_xid, p_seq) AND e.xid < v_bound
         ORDER BY e.xid, e.seq
         LIMIT p_limit;
    ELSE
        RETURN QUERY
        SELECT e.xid, e.seq, e.task_id, e.version, e.scope, e.type, e.data, e.at
          FROM events AS e
         WHERE (e.xid, e.seq) > (p_xid, p_seq) AND e.xid < v_bound
         ORDER BY e.xid, e.seq
         LIMIT p_limit;
    END IF;
END
$$;
