-- Pairing codes (docs/p1.md, "Pairing"; registry/pairing.py): a P1 reader shows a
-- one-time code, and its owner enters it where they link a wallet. The code only finds
-- the reader: the link still needs the wallet's signature and the reader's device-key
-- signature over the same link document (wallet_links, 0004).
--
-- Only the code's SHA-256 is stored. `offer` is the text the reader signed when it made
-- the code (meter, pairing id, code hash, expiry), checked against a key of the meter
-- that is valid now, so nobody else can open a pairing for that meter id. A claim issues
-- the link challenge (`challenge`) and spends the code; the reader then signs that
-- challenge's document (`meter_kid`, `meter_signature`).
CREATE TABLE pairing_codes (
    id              uuid PRIMARY KEY,
    meter_id        text NOT NULL REFERENCES meters (meter_id),
    code_sha256     bytea NOT NULL UNIQUE CHECK (octet_length(code_sha256) = 32),
    offer           text NOT NULL CHECK (char_length(offer) <= 4096),
    offer_kid       text NOT NULL,
    offer_signature text NOT NULL CHECK (char_length(offer_signature) <= 1024),
    issued_at       timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL CHECK (expires_at > issued_at),
    claimed_at      timestamptz,
    challenge       uuid UNIQUE REFERENCES wallet_challenges (id),
    meter_kid       text,
    meter_signature text CHECK (char_length(meter_signature) <= 1024),
    signed_at       timestamptz,
    CHECK ((claimed_at IS NULL) = (challenge IS NULL)),
    CHECK ((signed_at IS NULL) = (meter_signature IS NULL)),
    CHECK ((meter_kid IS NULL) = (meter_signature IS NULL)),
    CHECK (signed_at IS NULL OR claimed_at IS NOT NULL)
);

CREATE INDEX pairing_codes_meter ON pairing_codes (meter_id, issued_at DESC);
