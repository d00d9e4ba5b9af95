-- Storage that does not grow for ever (issue 16): the poison-batch guard's reason code,
-- per-meter rollups maintained in the same transaction as the readings, and what
-- retention keeps of the readings it removes (docs/scaling.md, "Retention and rollups").

-- A reading the database refuses (a constraint, a value it cannot hold) is parked here
-- with this reason instead of blocking its batch (ingest/store.py, reading-v1 section 9).
ALTER TABLE rejected_readings DROP CONSTRAINT rejected_readings_reason_check;
ALTER TABLE rejected_readings ADD CONSTRAINT rejected_readings_reason_check CHECK (reason IN (
    'malformed', 'topic_mismatch', 'unknown_meter', 'meter_not_active',
    'unsupported_alg', 'bad_signature', 'timestamp_skew', 'stale_reading',
    'seq_reused', 'register_decreased', 'rate_limited', 'store_refused'));

-- Per meter, what retention removed from reading_log: the latest retired reading in
-- (ts, seq) order, which stands in for it as the predecessor of later readings (rule 8,
-- rollups), and the highest retired seq, at or below which a seq not in reading_log was
-- stored before (rule 7: seq_reused; db/retention.py says why that is exact).
CREATE TABLE reading_watermarks (
    meter_id  text PRIMARY KEY,
    ts        timestamptz(3) NOT NULL,
    seq       u64 NOT NULL,
    import_wh u64 NOT NULL,
    export_wh u64 NOT NULL,
    max_seq   u64 NOT NULL
);

-- Ledger entries whose readings retention removed (or is removing, in chunks): always a
-- prefix of the anchored batches. `ledger verify` checks their chain and signatures and
-- continues the mint replay after the last of them from retired_mint_state.
CREATE TABLE retired_batches (
    batch      bigint PRIMARY KEY REFERENCES bridge_batches (batch),
    readings   bigint NOT NULL CHECK (readings >= 0),
    retired_at timestamptz NOT NULL DEFAULT now()
);

-- The bridge's per-meter mint state (bridge_mint_state) as of the last retired batch.
CREATE TABLE retired_mint_state (
    meter_id           text PRIMARY KEY,
    baseline_export_wh u64 NOT NULL,
    baseline_import_wh u64 NOT NULL,
    max_export_wh      u64 NOT NULL,
    max_import_wh      u64 NOT NULL,
    first_batch        bigint NOT NULL,
    last_batch         bigint NOT NULL
);

-- Energy per meter and interval (15 minutes, hour, UTC day) from register differences:
-- the difference between a reading and its predecessor in (ts, seq) order belongs to the
-- interval holding the later reading's ts; `readings` counts the readings whose ts falls
-- in the interval. No CHECK on the sums: a refused rollup would refuse its readings.
CREATE TABLE meter_rollups (
    meter_id  text NOT NULL,
    width     text NOT NULL,
    bucket    timestamptz NOT NULL,
    import_wh numeric NOT NULL,
    export_wh numeric NOT NULL,
    readings  bigint NOT NULL,
    PRIMARY KEY (meter_id, width, bucket)
);

-- Predecessor lookups in (ts, seq) order; it serves rule 8's lookups in ts order too.
CREATE INDEX reading_log_meter_ts_seq ON reading_log (meter_id, ts, seq);
DROP INDEX reading_log_meter_ts;

-- Once per statement (one per COPY of a batch): each new reading adds its own difference
-- and count to its intervals, and the older reading right after it, whose predecessor it
-- now is, has its difference corrected. The retired watermark is the predecessor of
-- anything after it. Readings of one meter are written by one transaction at a time
-- (the store locks the meter), so the neighbours read here are the committed ones.
CREATE FUNCTION meterproof_rollup_readings() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    WITH own AS (
        SELECT n.meter_id, n.ts, 1 AS readings,
               coalesce(n.import_wh - p.import_wh, 0) AS import_wh,
               coalesce(n.export_wh - p.export_wh, 0) AS export_wh
        FROM new_rows n
        LEFT JOIN LATERAL (
            SELECT x.import_wh, x.export_wh FROM (
                (SELECT l.ts, l.seq, l.import_wh, l.export_wh FROM reading_log l
                 WHERE l.meter_id = n.meter_id AND (l.ts, l.seq) < (n.ts, n.seq)
                 ORDER BY l.ts DESC, l.seq DESC LIMIT 1)
                UNION ALL
                SELECT w.ts, w.seq, w.import_wh, w.export_wh FROM reading_watermarks w
                WHERE w.meter_id = n.meter_id AND (w.ts, w.seq) < (n.ts, n.seq)
            ) x ORDER BY x.ts DESC, x.seq DESC LIMIT 1
        ) p ON true
    ), successors AS (
        SELECT DISTINCT s.meter_id, s.seq, s.ts, s.import_wh, s.export_wh
        FROM new_rows n
        CROSS JOIN LATERAL (
            SELECT l.meter_id, l.seq, l.ts, l.import_wh, l.export_wh FROM reading_log l
            WHERE l.meter_id = n.meter_id AND (l.ts, l.seq) > (n.ts, n.seq)
            ORDER BY l.ts, l.seq LIMIT 1
        ) s
        WHERE NOT EXISTS (SELECT 1 FROM new_rows o WHERE o.meter_id = s.meter_id AND o.seq = s.seq)
    ), moved AS (
        -- was s - old predecessor (0 without one), is s - new predecessor
        SELECT s.meter_id, s.ts, 0 AS readings,
               coalesce(op.import_wh, s.import_wh) - np.import_wh AS import_wh,
               coalesce(op.export_wh, s.export_wh) - np.export_wh AS export_wh
        FROM successors s
        CROSS JOIN LATERAL (
            SELECT l.import_wh, l.export_wh FROM reading_log l
            WHERE l.meter_id = s.meter_id AND (l.ts, l.seq) < (s.ts, s.seq)
            ORDER BY l.ts DESC, l.seq DESC LIMIT 1
        ) np
        LEFT JOIN LATERAL (
            SELECT x.import_wh, x.export_wh FROM (
                (SELECT l.ts, l.seq, l.import_wh, l.export_wh FROM reading_log l
                 WHERE l.meter_id = s.meter_id AND (l.ts, l.seq) < (s.ts, s.seq)
                   AND NOT EXISTS (SELECT 1 FROM new_rows o
                                   WHERE o.meter_id = l.meter_id AND o.seq = l.seq)
                 ORDER BY l.ts DESC, l.seq DESC LIMIT 1)
                UNION ALL
                SELECT w.ts, w.seq, w.import_wh, w.export_wh FROM reading_watermarks w
                WHERE w.meter_id = s.meter_id AND (w.ts, w.seq) < (s.ts, s.seq)
            ) x ORDER BY x.ts DESC, x.seq DESC LIMIT 1
        ) op ON true
    ), deltas AS (
        SELECT * FROM own UNION ALL SELECT * FROM moved
    )
    INSERT INTO meter_rollups AS r (meter_id, width, bucket, import_wh, export_wh, readings)
    SELECT d.meter_id, w.width, date_bin(w.step, d.ts, timestamptz '2000-01-01 00:00:00+00'),
           sum(d.import_wh), sum(d.export_wh), sum(d.readings)
    FROM deltas d
    CROSS JOIN (VALUES ('15m', interval '15 minutes'), ('1h', interval '1 hour'),
                       ('1d', interval '1 day')) AS w (width, step)
    GROUP BY 1, 2, 3
    ON CONFLICT (meter_id, width, bucket) DO UPDATE SET
        import_wh = r.import_wh + EXCLUDED.import_wh,
        export_wh = r.export_wh + EXCLUDED.export_wh,
        readings = r.readings + EXCLUDED.readings;
    RETURN NULL;
END
$$;

CREATE TRIGGER reading_log_rollups AFTER INSERT ON reading_log
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION meterproof_rollup_readings();

-- Readings stored before this migration, rolled up the same way.
INSERT INTO meter_rollups (meter_id, width, bucket, import_wh, export_wh, readings)
SELECT d.meter_id, w.width, date_bin(w.step, d.ts, timestamptz '2000-01-01 00:00:00+00'),
       sum(d.import_wh), sum(d.export_wh), count(*)
FROM (
    SELECT meter_id, ts,
           coalesce(import_wh - lag(import_wh) OVER m, 0) AS import_wh,
           coalesce(export_wh - lag(export_wh) OVER m, 0) AS export_wh
    FROM reading_log WINDOW m AS (PARTITION BY meter_id ORDER BY ts, seq)
) d
CROSS JOIN (VALUES ('15m', interval '15 minutes'), ('1h', interval '1 hour'),
                   ('1d', interval '1 day')) AS w (width, step)
GROUP BY 1, 2, 3;
