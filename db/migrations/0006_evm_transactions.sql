-- The evm ledger sink's transactions (bridge/evm/journal.py). A row is written and
-- committed before its signed transaction is broadcast, so after a crash the bridge
-- knows the nonce, fees and raw bytes of what it may have sent: it waits for it,
-- rebroadcasts it, or replaces it by nonce with higher fees, and never guesses.
-- The contract's one-anchor-per-batch rule keeps every outcome exactly once.
CREATE TABLE evm_transactions (
    tx_hash          bytea PRIMARY KEY CHECK (octet_length(tx_hash) = 32),
    idempotency_key  text NOT NULL,
    chain_id         bigint NOT NULL,
    sender           text NOT NULL,
    nonce            bigint NOT NULL CHECK (nonce >= 0),
    max_fee_wei      numeric(78, 0) NOT NULL,
    priority_fee_wei numeric(78, 0) NOT NULL,
    raw              bytea NOT NULL,
    sent_at          timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX evm_transactions_by_key ON evm_transactions (idempotency_key, sent_at);
