-- Task views, event data and snapshots are compressed with lz4 where the server has it.
--
-- Every append rewrites the task's row with its new view. A long task's view passes the
-- ~2 KB at which PostgreSQL compresses a row's large values (a demo task of 8 steps: 1.8 KB
-- of jsonb), and the default method, pglz, then costs more than the rest of the update
-- (measured: PostgreSQL's CPU per one-event item of taskcast_append_batch 61 -> 52 µs in
-- batches of 16, 43 -> 35 µs in batches of 64, with lz4). lz4 compresses and decompresses
-- several times faster than pglz, at a slightly lower ratio.
--
-- Only values written from now on use it: an existing value keeps its method until its row
-- is rewritten, which for a task's view is its next event. Nothing is rewritten here, and
-- each ALTER holds its table's lock only for the catalog update.
--
-- A server built without lz4 (the embedded one of `taskcast dev` is) refuses the method:
-- its columns stay as they were and the migration still applies.
DO $$
BEGIN
    ALTER TABLE tasks ALTER COLUMN view SET COMPRESSION lz4;
    ALTER TABLE events ALTER COLUMN data SET COMPRESSION lz4,
                       ALTER COLUMN snapshot SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'this PostgreSQL has no lz4: task views and events stay compressed with pglz';
END
$$;
