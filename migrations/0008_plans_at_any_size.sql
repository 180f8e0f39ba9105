-- The batch functions' plans stay right however small their tables were when planned.
--
-- A function's statements run generic plans (0004), cached for the life of the session and
-- made when the function first runs in it. A worker, node or relay that starts on a new
-- database plans them while `tasks` and `jobs` are nearly empty: each join by primary key
-- to one of them then became a hash join over a sequential scan of the whole table, and
-- stayed so as the table grew, until an ANALYZE happened to invalidate the plan (measured:
-- 7.3 million rows of `jobs` and 5.7 million of `tasks` read in the first 1,700 tasks at
-- 100 tasks/s, a claim and an append taking 1.4 ms at 1,000 tasks and 6 ms at 5,000).
-- Their statements reach those tables only by an index, so sequential scans are off in
-- them: what remains costs as much as its rows. `jit = off` beside it, as in 0007: a
-- disabled plan node's cost (10^10) would otherwise have PostgreSQL compile the plan.
--
-- Only settings change: every signature, answer and body stays as it was. A later
-- CREATE OR REPLACE of one of these functions replaces its settings with those it names:
-- it must name these again (tests/events/test_migrate.py checks them).
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid FROM pg_proc AS p
         WHERE pg_function_is_visible(p.oid)
           AND p.proname IN ('taskcast_append_batch', 'taskcast_claim', 'taskcast_claim_start',
                             'taskcast_create_batch', 'taskcast_remember_key', 'taskcast_used_keys')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET enable_seqscan = off SET jit = off', f);
    END LOOP;
END
$$;
