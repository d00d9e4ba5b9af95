-- The ledger bridge (bridge_*) and the embedded local ledger it anchors into (ledger_*).
-- docs/anchoring.md explains the design; the byte layouts of headers and mint lists are
-- specified there.

-- One row per batch: 'open' while it claims readings (reading_log.batch_id = batch),
-- 'pending' once sealed (entry built and signed, not yet acknowledged by the sink),
-- 'anchored' once the sink's receipt is recorded. Batches are sealed and anchored in
-- batch order, at most one is open.
CREATE TABLE bridge_batches (
    batch           bigint PRIMARY KEY CHECK (batch >= 1),
    epoch           bigint NOT NULL CHECK (epoch >= 0),
    epoch_ms        bigint NOT NULL CHECK (epoch_ms > 0),
    status          text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'pending', 'anchored')),
    opened_at       timestamptz NOT NULL DEFAULT now(),
    sealed_at       timestamptz,
    reading_count   bigint CHECK (reading_count >= 0),
    merkle_root     bytea CHECK (octet_length(merkle_root) = 32),
    header          bytea,
    signature       bytea CHECK (octet_length(signature) = 64),
    entry_hash      bytea UNIQUE CHECK (octet_length(entry_hash) = 32),
    minted_units    numeric(78, 0) CHECK (minted_units >= 0),
    idempotency_key text UNIQUE,
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text,
    anchored_at     timestamptz,
    receipt         jsonb,
    CHECK ((status = 'open') = (header IS NULL)),
    CHECK ((status = 'open') = (sealed_at IS NULL)),
    CHECK ((status = 'anchored') = (receipt IS NOT NULL))
);

CREATE UNIQUE INDEX bridge_batches_one_open ON bridge_batches ((true)) WHERE status = 'open';
CREATE INDEX bridge_batches_pending ON bridge_batches (batch) WHERE status = 'pending';

-- Running per-meter aggregates of the open batch's claimed readings, written by the same
-- statement that claims them: the first reading in (ts, seq) order and the highest
-- registers. Sealing turns them into mints and deletes them.
CREATE TABLE bridge_batch_meters (
    batch           bigint NOT NULL REFERENCES bridge_batches (batch),
    meter_id        text NOT NULL,
    readings        bigint NOT NULL CHECK (readings > 0),
    first_ts        timestamptz(3) NOT NULL,
    first_seq       u64 NOT NULL,
    first_export_wh u64 NOT NULL,
    first_import_wh u64 NOT NULL,
    max_export_wh   u64 NOT NULL,
    max_import_wh   u64 NOT NULL,
    PRIMARY KEY (batch, meter_id)
);

-- Per meter: the registers of its first anchored reading (the baseline) and the highest
-- ones anchored so far. A batch mints the increase of the highest export, so the total
-- minted is always (max - baseline) / 1000 GRID, whatever order readings arrive in.
CREATE TABLE bridge_mint_state (
    meter_id           text PRIMARY KEY REFERENCES meters (meter_id),
    baseline_export_wh u64 NOT NULL,
    baseline_import_wh u64 NOT NULL,
    max_export_wh      u64 NOT NULL CHECK (max_export_wh >= baseline_export_wh),
    max_import_wh      u64 NOT NULL CHECK (max_import_wh >= baseline_import_wh),
    first_batch        bigint NOT NULL REFERENCES bridge_batches (batch),
    last_batch         bigint NOT NULL REFERENCES bridge_batches (batch)
);

-- A sealed batch's mint list: export delta minted, import delta kept for settlement.
CREATE TABLE bridge_mints (
    batch           bigint NOT NULL REFERENCES bridge_batches (batch),
    meter_id        text NOT NULL,
    owner_wallet    text,
    export_delta_wh u64 NOT NULL,
    import_delta_wh u64 NOT NULL,
    grid_units      numeric(78, 0) NOT NULL CHECK (grid_units = export_delta_wh * 1000000000000000),
    PRIMARY KEY (batch, meter_id)
);

-- The local ledger: what the `local` sink appends to. It is independent of the tables
-- above (no foreign keys into them) so it reads like any other ledger: a hash chain of
-- signed headers, their mint lists, and the resulting GRID balances.
CREATE TABLE ledger_entries (
    seq             bigint PRIMARY KEY CHECK (seq >= 1),
    idempotency_key text NOT NULL UNIQUE,
    -- The header's fields, for queries; `header` holds the signed bytes themselves.
    epoch           bigint NOT NULL,
    epoch_ms        bigint NOT NULL,
    prev_hash       bytea NOT NULL CHECK (octet_length(prev_hash) = 32),
    merkle_root     bytea NOT NULL CHECK (octet_length(merkle_root) = 32),
    reading_count   bigint NOT NULL,
    mint_hash       bytea NOT NULL CHECK (octet_length(mint_hash) = 32),
    oracle_key      bytea NOT NULL CHECK (octet_length(oracle_key) = 32),
    header          bytea NOT NULL,
    signature       bytea NOT NULL CHECK (octet_length(signature) = 64),
    entry_hash      bytea NOT NULL UNIQUE CHECK (octet_length(entry_hash) = 32),
    minted_units    numeric(78, 0) NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ledger_mints (
    entry           bigint NOT NULL REFERENCES ledger_entries (seq),
    meter_id        text NOT NULL,
    wallet          text,
    export_delta_wh u64 NOT NULL,
    import_delta_wh u64 NOT NULL,
    grid_units      numeric(78, 0) NOT NULL,
    PRIMARY KEY (entry, meter_id)
);

CREATE INDEX ledger_mints_wallet ON ledger_mints (wallet);

-- Derived from ledger_mints in the same transaction as each append (`ledger verify` checks
-- it); the only ledger table that is updated.
CREATE TABLE ledger_balances (
    wallet     text PRIMARY KEY,
    grid_units numeric(78, 0) NOT NULL CHECK (grid_units >= 0),
    last_entry bigint NOT NULL REFERENCES ledger_entries (seq)
);

CREATE FUNCTION meterproof_ledger_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only: % on % refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION meterproof_ledger_append_only();
CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION meterproof_ledger_append_only();
CREATE TRIGGER ledger_mints_append_only BEFORE UPDATE OR DELETE ON ledger_mints
    FOR EACH ROW EXECUTE FUNCTION meterproof_ledger_append_only();
CREATE TRIGGER ledger_mints_no_truncate BEFORE TRUNCATE ON ledger_mints
    FOR EACH STATEMENT EXECUTE FUNCTION meterproof_ledger_append_only();
