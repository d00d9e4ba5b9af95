-- The API reads one meter's readings in (ts, seq) order: a meter-day of history, the
-- latest reading (api/reads.py). readings' unique key led with seq, so those reads went
-- through reading_log's (meter_id, ts, seq) index and fetched every row by its key, one
-- probe per reading; with 10 million readings stored, the planner took a hash join over
-- every partition instead (4.3 s for a meter-day, docs/api.md "Measured"). The same
-- columns in (meter_id, ts, seq) order enforce the same uniqueness, serve those reads
-- from one index range per partition, and cost a write nothing more: the old index goes.
-- Retention deletes by all three columns, `ledger verify` joins on all rows: both
-- indifferent to the order.
ALTER TABLE readings ADD CONSTRAINT readings_meter_id_ts_seq_key UNIQUE (meter_id, ts, seq);
ALTER TABLE readings DROP CONSTRAINT readings_meter_id_seq_ts_key;
