-- Seed 003's energy providers (docs/api.md, "Seed 003's provider format").
--
-- A provider submits readings of one meter, signed with one Ed25519 key: the meter is
-- registered with that key under kid = provider_id, so the ingest pipeline judges a
-- provider reading with the registry it already caches, and the provider is active
-- exactly when its meter accepts readings (registry status, quarantine, decommission).
CREATE TABLE providers (
    provider_id      text PRIMARY KEY CHECK (provider_id ~ '^[A-Za-z0-9._-]{1,64}$'),
    meter_id         text NOT NULL UNIQUE REFERENCES meters (meter_id),
    -- Never two providers with one key: the seed's signed bytes have no lengths, so the
    -- same key under two (provider, meter) splits of the same text would verify both.
    public_key       bytea NOT NULL UNIQUE CHECK (octet_length(public_key) = 32),
    owner            text NOT NULL,
    location         text NOT NULL,
    capacity_kwh     u64 NOT NULL,
    price_per_kwh    u64 NOT NULL,
    stake_amount_ct  u64 NOT NULL,
    -- The registration's signed bytes and signature: the proof the registrant held the key.
    registration     bytea NOT NULL,
    registration_sig bytea NOT NULL CHECK (octet_length(registration_sig) = 64),
    registered_by    text NOT NULL,
    registered_at    timestamptz NOT NULL DEFAULT now()
);

-- The original signed bytes of every stored provider reading, written in the transaction
-- that stores the reading (api/provider_store.py), so a third party can check the
-- provider's Ed25519 signature over exactly what it signed and then recompute the
-- reading's reading_hash (schemas/provider.py) to follow it into the ledger. Keyed like
-- reading_log, but without a foreign key to it: retention removes reading_log rows, and
-- what a provider signed stays checkable after that.
CREATE TABLE provider_readings (
    meter_id     text NOT NULL,
    seq          u64 NOT NULL,
    reading_hash bytea NOT NULL CHECK (octet_length(reading_hash) = 32),
    provider_id  text NOT NULL REFERENCES providers (provider_id),
    signed_bytes bytea NOT NULL,
    signature    bytea NOT NULL CHECK (octet_length(signature) = 64),
    stored_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (meter_id, seq)
);

CREATE INDEX provider_readings_hash ON provider_readings (reading_hash);
