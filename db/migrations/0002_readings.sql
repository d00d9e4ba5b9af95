-- Verified readings, the durable judge of "seen before", and the rejected-readings store.

-- reading-v1's u64 fields (seq, import_wh, export_wh) do not fit bigint.
CREATE DOMAIN u64 AS numeric(20, 0) CHECK (VALUE BETWEEN 0 AND 18446744073709551615);

-- Daily partitions in UTC, created ahead of time by this function (called below, by every
-- `migrate`, and periodically by the workers and the bridge). A concurrent call waits on
-- the lock instead of failing on the same CREATE TABLE. Rows that landed in the DEFAULT
-- partition for a day that now gets its own partition are moved into it, because
-- PostgreSQL refuses to create a partition whose range the DEFAULT partition holds rows of.
CREATE FUNCTION meterproof_ensure_partitions(from_ts timestamptz, to_ts timestamptz)
RETURNS integer
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    day date;
    part text;
    lo timestamptz;
    hi timestamptz;
    created integer := 0;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = 'readings'::regclass) THEN
        RETURN 0;  -- a TimescaleDB hypertable makes its own chunks
    END IF;
    PERFORM pg_advisory_xact_lock(7302166411205843185);
    FOR day IN
        SELECT generate_series((from_ts AT TIME ZONE 'UTC')::date, (to_ts AT TIME ZONE 'UTC')::date,
                               interval '1 day')::date
    LOOP
        part := 'readings_' || to_char(day, 'YYYYMMDD');
        CONTINUE WHEN to_regclass(quote_ident(part)) IS NOT NULL;
        lo := day::timestamp AT TIME ZONE 'UTC';
        hi := (day + 1)::timestamp AT TIME ZONE 'UTC';
        EXECUTE format('CREATE TABLE %I (LIKE readings INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part);
        EXECUTE format(
            'WITH moved AS (DELETE FROM readings_default WHERE ts >= $1 AND ts < $2 RETURNING *) '
            'INSERT INTO %I SELECT * FROM moved', part) USING lo, hi;
        EXECUTE format('ALTER TABLE readings ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                       part, lo, hi);
        created := created + 1;
    END LOOP;
    RETURN created;
END
$$;

DO $migration$
DECLARE
    -- ts: the wire's unix milliseconds, stored as timestamptz(3) because PostgreSQL can
    -- partition only on a stored column. UNIQUE must contain the partition key, so
    -- (meter_id, seq) alone is enforced by reading_log below.
    columns CONSTANT text := $columns$
        meter_id           text NOT NULL,
        seq                u64 NOT NULL,
        ts                 timestamptz(3) NOT NULL,
        import_wh          u64 NOT NULL,
        export_wh          u64 NOT NULL,
        power_w            bigint,
        voltage_mv         bigint,
        current_ma         bigint,
        frequency_mhz      bigint,
        power_factor_milli bigint,
        alg                text NOT NULL CHECK (alg IN ('EdDSA', 'ES256', 'RS256', 'PS256')),
        kid                text CHECK (char_length(kid) BETWEEN 1 AND 64),
        sig                bytea NOT NULL,
        reading_hash       bytea NOT NULL CHECK (octet_length(reading_hash) = 32),
        received_at        timestamptz NOT NULL,
        verified_at        timestamptz NOT NULL,
        stored_at          timestamptz NOT NULL DEFAULT now(),
        UNIQUE (meter_id, seq, ts)
    $columns$;
BEGIN
    -- TimescaleDB refuses CREATE EXTENSION unless the server preloads it, so an installed
    -- but unloaded package falls back to native partitioning instead of failing here.
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')
       AND current_setting('shared_preload_libraries') LIKE '%timescaledb%' THEN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
        EXECUTE 'CREATE TABLE readings (' || columns || ')';
        PERFORM create_hypertable('readings', 'ts', chunk_time_interval => interval '1 day');
    ELSE
        EXECUTE 'CREATE TABLE readings (' || columns || ') PARTITION BY RANGE (ts)';
        -- An insert never fails for lack of a partition (a meter with a wrong clock, a
        -- worker that has not created tomorrow's partition yet).
        CREATE TABLE readings_default PARTITION OF readings DEFAULT;
        PERFORM meterproof_ensure_partitions(now() - interval '8 days', now() + interval '7 days');
    END IF;
END
$migration$;

-- One row per stored reading, written in the same transaction: the durable judge of
-- duplicate / seq_reused (rule 7), the registers that rule 8 compares (a plain table is
-- cheaper to probe than every partition), and the ledger bridge's work queue. The bridge claims
-- with `UPDATE reading_log SET batch_id = $1 WHERE batch_id IS NULL ...`, so a reading
-- whose transaction commits late is claimed by a later batch: never skipped, never twice.
CREATE TABLE reading_log (
    meter_id     text NOT NULL REFERENCES meters (meter_id),
    seq          u64 NOT NULL,
    reading_hash bytea NOT NULL CHECK (octet_length(reading_hash) = 32),
    ts           timestamptz(3) NOT NULL,
    import_wh    u64 NOT NULL,
    export_wh    u64 NOT NULL,
    stored_at    timestamptz NOT NULL DEFAULT now(),
    batch_id     bigint,
    PRIMARY KEY (meter_id, seq)
);

-- Rule 8 looks up a meter's neighbours in ts order.
CREATE INDEX reading_log_meter_ts ON reading_log (meter_id, ts);

-- In the epoch order of reading-v1 section 8, and small: claimed rows leave it.
CREATE INDEX reading_log_unclaimed ON reading_log (ts, meter_id, seq) WHERE batch_id IS NULL;
CREATE INDEX reading_log_batch ON reading_log (batch_id);

-- Everything that reached a worker and was refused, with its raw bytes. Nothing here may
-- refuse a row the worker has to keep: the payload-derived columns are unchecked, because
-- the payload is whatever a client sent.
CREATE TABLE rejected_readings (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payload      bytea NOT NULL,
    topic        text NOT NULL,
    tls_identity text,
    meter_id     text,
    seq          u64,
    reading_hash bytea CHECK (octet_length(reading_hash) = 32),
    reason       text NOT NULL CHECK (reason IN (
                     'malformed', 'topic_mismatch', 'unknown_meter', 'meter_not_active',
                     'unsupported_alg', 'bad_signature', 'timestamp_skew', 'stale_reading',
                     'seq_reused', 'register_decreased', 'rate_limited')),
    detail       text,
    received_at  timestamptz NOT NULL,
    stored_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX rejected_readings_meter_stored ON rejected_readings (meter_id, stored_at);
