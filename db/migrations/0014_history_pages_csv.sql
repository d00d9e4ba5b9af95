-- History pages as CSV too: a meter-day read as CSV was still rendered row by row (p50
-- 66-75 ms against 35-39 ms for the same day as JSON through pages, docs/api.md). A page
-- now keeps its quarter's readings both ways, rendered in the same statement from the
-- same rows (api/pages.py), so the two never disagree on which readings a page holds.
--
-- Both compressed with lz4 instead of the default pglz: in one process (docs/api.md,
-- "History pages") a meter-day's JSON pages were read in ~10 ms against ~15, rendering
-- cost ~7 us per reading against ~16, and the CSV, which pglz gave up on, took 20 MB
-- against 25. A server built without lz4 keeps pglz, with a notice.
ALTER TABLE history_pages ADD COLUMN csv text;  -- api/reads.py CSV_ROW lines, (ts, seq) order

DO $$
BEGIN
    ALTER TABLE history_pages
        ALTER COLUMN body SET COMPRESSION lz4,
        ALTER COLUMN csv SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'this PostgreSQL has no lz4: history pages stay compressed with pglz';
END
$$;

-- Pages rendered before have no CSV and pglz bodies: queued again, they are rendered anew;
-- until then a CSV read of their quarters reads rows, as before.
INSERT INTO history_dirty (meter_id, bucket)
SELECT meter_id, bucket FROM history_pages
ON CONFLICT DO NOTHING;
