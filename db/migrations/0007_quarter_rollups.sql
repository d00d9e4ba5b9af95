-- Rollups kept per 15 minutes only (docs/scaling.md, "Rollups"): the trigger of 0005
-- upserted three rows per meter and interval inside the batch transaction, which holds
-- the meters' locks; hours and days are sums of their quarters, computed when read.
-- A difference belongs to the interval of the later reading's ts, so a quarter lies
-- wholly inside one hour and one UTC day and the sums are exact.
ALTER TABLE meter_rollups RENAME TO meter_quarters;
DELETE FROM meter_quarters WHERE width <> '15m';
ALTER TABLE meter_quarters DROP CONSTRAINT meter_rollups_pkey;
ALTER TABLE meter_quarters DROP COLUMN width;
ALTER TABLE meter_quarters ADD PRIMARY KEY (meter_id, bucket);

-- The three widths under the old name and layout, for SQL written against 0005;
-- db/rollups.py reads meter_quarters itself, one primary-key range per call.
CREATE VIEW meter_rollups AS
SELECT meter_id, '15m'::text AS width, bucket, import_wh, export_wh, readings
FROM meter_quarters
UNION ALL
SELECT meter_id, w.width, date_bin(w.step, bucket, timestamptz '2000-01-01 00:00:00+00'),
       sum(import_wh), sum(export_wh), sum(readings)::bigint
FROM meter_quarters
CROSS JOIN (VALUES ('1h', interval '1 hour'), ('1d', interval '1 day')) AS w (width, step)
GROUP BY 1, 2, 3;

-- 0005's function with one upsert per meter and quarter instead of three, and a short
-- way for the common case: a meter whose new readings all come after its stored ones (a
-- backlog or live traffic in order) has, within the batch, its predecessors by lag() and
-- no successor to correct, so one index probe per meter instead of two per reading. The
-- others (late or out-of-order arrivals) take 0005's way, per reading.
CREATE OR REPLACE FUNCTION meterproof_rollup_readings() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    WITH batch AS (
        -- per meter: its first new reading in (ts, seq) order and how many it has
        SELECT DISTINCT ON (n.meter_id) n.meter_id, n.ts, n.seq,
               count(*) OVER (PARTITION BY n.meter_id) AS k
        FROM new_rows n ORDER BY n.meter_id, n.ts, n.seq
    ), tails AS (
        -- at or after the first new reading, only the k new ones: nothing stored after it
        SELECT b.meter_id, p.import_wh, p.export_wh FROM batch b
        LEFT JOIN LATERAL (
            SELECT x.import_wh, x.export_wh FROM (
                (SELECT l.ts, l.seq, l.import_wh, l.export_wh FROM reading_log l
                 WHERE l.meter_id = b.meter_id AND (l.ts, l.seq) < (b.ts, b.seq)
                 ORDER BY l.ts DESC, l.seq DESC LIMIT 1)
                UNION ALL
                SELECT w.ts, w.seq, w.import_wh, w.export_wh FROM reading_watermarks w
                WHERE w.meter_id = b.meter_id AND (w.ts, w.seq) < (b.ts, b.seq)
            ) x ORDER BY x.ts DESC, x.seq DESC LIMIT 1
        ) p ON true
        WHERE (SELECT count(*) FROM (
                  SELECT FROM reading_log l
                  WHERE l.meter_id = b.meter_id AND (l.ts, l.seq) >= (b.ts, b.seq)
                  LIMIT b.k + 1) a) = b.k
    ), own_tail AS (
        SELECT n.meter_id, n.ts, 1 AS readings,
               coalesce(n.import_wh - coalesce(lag(n.import_wh) OVER m, t.import_wh), 0)
                   AS import_wh,
               coalesce(n.export_wh - coalesce(lag(n.export_wh) OVER m, t.export_wh), 0)
                   AS export_wh
        FROM new_rows n JOIN tails t ON t.meter_id = n.meter_id
        WINDOW m AS (PARTITION BY n.meter_id ORDER BY n.ts, n.seq)
    ), rest AS (
        SELECT n.* FROM new_rows n
        WHERE NOT EXISTS (SELECT 1 FROM tails t WHERE t.meter_id = n.meter_id)
    ), own AS (
        SELECT n.meter_id, n.ts, 1 AS readings,
               coalesce(n.import_wh - p.import_wh, 0) AS import_wh,
               coalesce(n.export_wh - p.export_wh, 0) AS export_wh
        FROM rest n
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
        FROM rest n
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
        SELECT * FROM own_tail UNION ALL SELECT * FROM own UNION ALL SELECT * FROM moved
    )
    INSERT INTO meter_quarters AS r (meter_id, bucket, import_wh, export_wh, readings)
    SELECT d.meter_id, date_bin(interval '15 minutes', d.ts, timestamptz '2000-01-01 00:00:00+00'),
           sum(d.import_wh), sum(d.export_wh), sum(d.readings)
    FROM deltas d
    GROUP BY 1, 2
    ON CONFLICT (meter_id, bucket) DO UPDATE SET
        import_wh = r.import_wh + EXCLUDED.import_wh,
        export_wh = r.export_wh + EXCLUDED.export_wh,
        readings = r.readings + EXCLUDED.readings;
    RETURN NULL;
END
$$;
