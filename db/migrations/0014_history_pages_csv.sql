-- History pages as CSV too: a meter-day read as CSV was still rendered row by row (p50
-- 66-75 ms against 35-39 ms for the same day as JSON through pages, docs/api.md). A page
-- now keeps its quarter's readings both ways, rendered in the same statement from the
-- same rows (api/pages.py), so the two never disagree on which readings a page holds.
--
-- Pages rendered before this migration have no CSV: they are queued again, and until the
-- renderer has taken them a CSV read of their quarters reads rows, as before.
ALTER TABLE history_pages ADD COLUMN csv text;  -- api/reads.py CSV_ROW lines, (ts, seq) order

INSERT INTO history_dirty (meter_id, bucket)
SELECT meter_id, bucket FROM history_pages
ON CONFLICT DO NOTHING;
