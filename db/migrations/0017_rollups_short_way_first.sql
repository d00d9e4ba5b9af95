-- Rollups: the short way in a statement of its own, before the others and without them
-- when every meter of the batch takes it (a connected meter's next reading, the live path's
-- common case).
--
-- 0016 found the short way's meters inside one statement that also prepares the range and
-- per-reading ways for every meter: four arrays per meter, a span count, the CTEs for the
-- other ways, a materialized row per meter. For a batch of 30 meters with one reading each,
-- all taking the short way, the trigger cost ~47 us of backend CPU per reading; a statement
-- doing the short way alone ~15 (docs/scaling.md, "The rollup trigger's short way on its
-- own"). Now that statement runs first; 0016's statement runs only when some meter is left,
-- and it leaves out the meters taken here (its `single`, the same condition).
CREATE OR REPLACE FUNCTION meterproof_rollup_readings() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    left_over text[];  -- meters the short way did not take
BEGIN
    -- The short way, on its own: a meter with one new reading and nothing stored at or
    -- after its ts (but itself) adds the reading's difference from its predecessor, the
    -- last stored reading before it in (ts, seq) order or the retired watermark, whichever
    -- is later (0016's `single`: the same condition, the same difference).
    WITH one AS (
        SELECT n.meter_id, count(*) AS k, min(n.ts) AS ts, min(n.seq) AS seq,
               min(n.import_wh) AS import_wh, min(n.export_wh) AS export_wh
        FROM new_rows n GROUP BY n.meter_id
    ), judged AS (
        SELECT o.meter_id, o.ts, o.import_wh, o.export_wh,
               CASE WHEN w.ts IS NOT NULL AND (p.ts IS NULL OR (w.ts, w.seq) > (p.ts, p.seq))
                    THEN w.import_wh ELSE p.import_wh END AS p_import,
               CASE WHEN w.ts IS NOT NULL AND (p.ts IS NULL OR (w.ts, w.seq) > (p.ts, p.seq))
                    THEN w.export_wh ELSE p.export_wh END AS p_export,
               o.k = 1 AND (w.ts IS NULL OR w.ts < o.ts) AND NOT EXISTS (
                   SELECT FROM reading_log l
                   WHERE l.meter_id = o.meter_id AND l.ts >= o.ts AND l.seq <> o.seq) AS short
        FROM one o
        LEFT JOIN LATERAL (
            SELECT w.ts, w.seq, w.import_wh, w.export_wh FROM reading_watermarks w
            WHERE o.k = 1 AND w.meter_id = o.meter_id
            LIMIT 1
        ) w ON true
        LEFT JOIN LATERAL (
            SELECT l.ts, l.seq, l.import_wh, l.export_wh FROM reading_log l
            WHERE o.k = 1 AND l.meter_id = o.meter_id AND l.ts < o.ts
            ORDER BY l.ts DESC, l.seq DESC LIMIT 1
        ) p ON true
    ), added AS (
        INSERT INTO meter_quarters AS r (meter_id, bucket, import_wh, export_wh, readings)
        SELECT j.meter_id,
               date_bin(interval '15 minutes', j.ts, timestamptz '2000-01-01 00:00:00+00'),
               coalesce(j.import_wh - j.p_import, 0), coalesce(j.export_wh - j.p_export, 0), 1
        FROM judged j
        WHERE j.short
        ON CONFLICT (meter_id, bucket) DO UPDATE SET
            import_wh = r.import_wh + EXCLUDED.import_wh,
            export_wh = r.export_wh + EXCLUDED.export_wh,
            readings = r.readings + EXCLUDED.readings
    )
    SELECT array_agg(j.meter_id) FILTER (WHERE NOT j.short) INTO left_over FROM judged j;
    IF left_over IS NULL THEN
        RETURN NULL;
    END IF;
    -- Every other meter: 0016's ways, which leave out the meters taken above (its
    -- `single`, the same condition). A few are picked out of the batch by name; when many
    -- are left (a backlog's interleaved readings), comparing each new reading with every
    -- name would cost more than 0016's ways spend on the short way's meters.
    IF cardinality(left_over) > 64 THEN
        left_over := NULL;
    END IF;
    WITH span AS (
        -- per meter, its new readings as arrays: every later step starts from one row per
        -- meter, so no plan joins two sets of readings (a plan cached for a small first
        -- batch would join them by nested loops)
        SELECT n.meter_id, count(*) AS k, min(n.ts) AS lo_ts, max(n.ts) AS hi_ts,
               array_agg(n.ts) AS tss, array_agg(n.seq) AS seqs,
               array_agg(n.import_wh) AS imps, array_agg(n.export_wh) AS exps
        FROM new_rows n
        WHERE left_over IS NULL OR n.meter_id = ANY (left_over)
        GROUP BY n.meter_id
    ), judged AS (
        -- the chain's predecessor (stored or retired), the stored readings inside the span
        -- of ts (new ones included; at most as many as the bound needs) and the first one
        -- after it
        SELECT s.*, r.n, r.tss AS in_tss, r.seqs AS in_seqs, r.imps AS in_imps,
               r.exps AS in_exps, a.ts AS a_ts, a.seq AS a_seq, a.import_wh AS a_import,
               a.export_wh AS a_export,
               CASE WHEN w.ts < s.lo_ts AND (p.ts IS NULL OR (w.ts, w.seq) > (p.ts, p.seq))
                    THEN w.import_wh ELSE p.import_wh END AS p_import,
               CASE WHEN w.ts < s.lo_ts AND (p.ts IS NULL OR (w.ts, w.seq) > (p.ts, p.seq))
                    THEN w.export_wh ELSE p.export_wh END AS p_export,
               r.n <= 8 * s.k + 32 AND (w.ts IS NULL OR w.ts < s.lo_ts) AS near,
               s.k = 1 AND r.n = 1 AND a.ts IS NULL AND (w.ts IS NULL OR w.ts < s.lo_ts)
                   AS single
        FROM span s
        LEFT JOIN LATERAL (
            SELECT w.ts, w.seq, w.import_wh, w.export_wh FROM reading_watermarks w
            WHERE w.meter_id = s.meter_id
            LIMIT 1  -- at most one anyway; keeps it a probe per meter, never a join
        ) w ON true
        LEFT JOIN LATERAL (
            SELECT l.ts, l.seq, l.import_wh, l.export_wh FROM reading_log l
            WHERE l.meter_id = s.meter_id AND l.ts < s.lo_ts
            ORDER BY l.ts DESC, l.seq DESC LIMIT 1
        ) p ON true
        CROSS JOIN LATERAL (
            SELECT count(*) AS n, array_agg(x.ts) AS tss, array_agg(x.seq) AS seqs,
                   array_agg(x.import_wh) AS imps, array_agg(x.export_wh) AS exps
            FROM (SELECT l.ts, l.seq, l.import_wh, l.export_wh FROM reading_log l
                  WHERE l.meter_id = s.meter_id AND l.ts >= s.lo_ts AND l.ts <= s.hi_ts
                  LIMIT 8 * s.k + 33) x
        ) r
        LEFT JOIN LATERAL (
            SELECT l.ts, l.seq, l.import_wh, l.export_wh FROM reading_log l
            WHERE l.meter_id = s.meter_id AND l.ts > s.hi_ts
            ORDER BY l.ts, l.seq LIMIT 1
        ) a ON true
    ), chain AS (
        -- the range way: every reading from the span's first ts to the first stored one
        -- after its last; a new one is there twice (stored, and in its meter's arrays)
        SELECT c.meter_id, c.ts, c.seq, c.import_wh, c.export_wh, bool_or(c.new) AS new,
               c.p_import, c.p_export
        FROM (
            SELECT j.meter_id, u.ts, u.seq, u.import_wh, u.export_wh, u.new, j.p_import,
                   j.p_export
            FROM judged j CROSS JOIN LATERAL (
                SELECT *, true AS new FROM unnest(j.tss, j.seqs, j.imps, j.exps)
                UNION ALL
                SELECT *, false FROM unnest(j.in_tss, j.in_seqs, j.in_imps, j.in_exps)
                UNION ALL
                SELECT j.a_ts, j.a_seq, j.a_import, j.a_export, false WHERE j.a_ts IS NOT NULL
            ) u (ts, seq, import_wh, export_wh, new)
            WHERE j.near AND NOT j.single
        ) c
        GROUP BY c.meter_id, c.seq, c.ts, c.import_wh, c.export_wh, c.p_import, c.p_export
    ), chain_is AS (
        -- every reading of the chain against its predecessor in it; the new ones count
        SELECT c.meter_id, c.ts, c.new::int AS readings,
               coalesce(c.import_wh - coalesce(lag(c.import_wh) OVER m, c.p_import), 0)
                   AS import_wh,
               coalesce(c.export_wh - coalesce(lag(c.export_wh) OVER m, c.p_export), 0)
                   AS export_wh
        FROM chain c
        WINDOW m AS (PARTITION BY c.meter_id ORDER BY c.ts, c.seq)
    ), chain_was AS (
        -- what its stored readings contributed against their old predecessors, taken back
        SELECT c.meter_id, c.ts, 0 AS readings,
               -coalesce(c.import_wh - coalesce(lag(c.import_wh) OVER m, c.p_import), 0)
                   AS import_wh,
               -coalesce(c.export_wh - coalesce(lag(c.export_wh) OVER m, c.p_export), 0)
                   AS export_wh
        FROM chain c
        WHERE NOT c.new
        WINDOW m AS (PARTITION BY c.meter_id ORDER BY c.ts, c.seq)
    ), rest AS (
        -- 0005's way, per reading
        SELECT j.meter_id, u.ts, u.seq, u.import_wh, u.export_wh, j.seqs
        FROM judged j, unnest(j.tss, j.seqs, j.imps, j.exps) AS u(ts, seq, import_wh, export_wh)
        WHERE NOT j.near
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
        SELECT DISTINCT ON (s.meter_id, s.seq) s.meter_id, s.seq, s.ts, s.import_wh,
               s.export_wh, n.seqs
        FROM rest n
        CROSS JOIN LATERAL (
            SELECT l.meter_id, l.seq, l.ts, l.import_wh, l.export_wh FROM reading_log l
            WHERE l.meter_id = n.meter_id AND (l.ts, l.seq) > (n.ts, n.seq)
            ORDER BY l.ts, l.seq LIMIT 1
        ) s
        WHERE s.seq <> ALL (n.seqs)
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
                   AND l.seq <> ALL (s.seqs)
                 ORDER BY l.ts DESC, l.seq DESC LIMIT 1)
                UNION ALL
                SELECT w.ts, w.seq, w.import_wh, w.export_wh FROM reading_watermarks w
                WHERE w.meter_id = s.meter_id AND (w.ts, w.seq) < (s.ts, s.seq)
            ) x ORDER BY x.ts DESC, x.seq DESC LIMIT 1
        ) op ON true
    ), deltas AS (
        SELECT * FROM chain_is UNION ALL SELECT * FROM chain_was
        UNION ALL SELECT * FROM own UNION ALL SELECT * FROM moved
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
