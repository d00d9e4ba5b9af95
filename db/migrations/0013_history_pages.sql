-- A meter-day of history is 17,280 readings, and rendering each one as JSON in the read
-- cost PostgreSQL ~33 ms of a ~120 ms answer (docs/api.md, "History pages"). A closed
-- quarter's readings rarely change, so the API renders them once into a page
-- (api/pages.py) and a history read that fits in one answer joins pages instead.
--
-- A page is used only while its `readings` equals the quarter's count in meter_quarters,
-- which the rollup trigger keeps in the same transaction as every stored reading: a late
-- reading makes the page stale at once, and the read takes that quarter's rows instead.
-- Retention deletes the pages of the quarters it removes readings from (db/retention.py).
CREATE TABLE history_pages (
    meter_id text NOT NULL,
    bucket   timestamptz NOT NULL,  -- the quarter's start, as meter_quarters.bucket
    readings bigint NOT NULL,
    body     text NOT NULL,  -- the readings' JSON objects in (ts, seq) order, comma-joined
    PRIMARY KEY (meter_id, bucket)
);

-- Quarters that gained readings since their page was rendered (or never had one): the
-- renderer's queue, arrival-ordered work instead of a scan of every quarter. A stored
-- batch adds one row per meter and quarter it touched; a quarter already queued costs one
-- index probe.
CREATE TABLE history_dirty (
    meter_id text NOT NULL,
    bucket   timestamptz NOT NULL,
    PRIMARY KEY (meter_id, bucket)
);
CREATE INDEX history_dirty_bucket ON history_dirty (bucket);

CREATE FUNCTION meterproof_queue_history_pages() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO history_dirty (meter_id, bucket)
    SELECT DISTINCT meter_id,
           date_bin(interval '15 minutes', ts, timestamptz '2000-01-01 00:00:00+00')
    FROM new_rows
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER reading_log_history_pages AFTER INSERT ON reading_log
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION meterproof_queue_history_pages();

-- What is stored already gets its pages too.
INSERT INTO history_dirty (meter_id, bucket) SELECT meter_id, bucket FROM meter_quarters;
