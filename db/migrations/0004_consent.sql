-- Who may see a meter's data besides the operator: integrators, proven wallet links and
-- owner consents (docs/consent.md). Consents and their events are append-only; the
-- current state of a consent is a view over them, so the audit trail is the state.

-- A CAIP-10 account id, normalised by registry/accounts.py before it gets here.
CREATE DOMAIN account_id AS text
    CHECK (VALUE ~ '^[-a-z0-9]{3,8}:[-_a-zA-Z0-9]{1,32}:[-.%a-zA-Z0-9]{1,128}$'
           AND char_length(VALUE) <= 128);

-- A stable reason code: the same string in a refusal, a log line and a metric label.
CREATE DOMAIN reason_code AS text CHECK (VALUE ~ '^[a-z][a-z0-9_]{0,63}$');

CREATE TABLE integrators (
    -- A certificate CN (certs/layout.py IDENTITY_RE) and a topic level.
    name           text PRIMARY KEY
                   CHECK (name ~ '^[A-Za-z0-9._-]{1,64}$' AND name NOT IN ('.', '..')),
    status         text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
    cert_serial    text NOT NULL CHECK (cert_serial ~ '^[0-9a-f]{1,40}$'),
    -- The API client secret's SHA-256: 32 random bytes need no slow hash.
    secret_sha256  bytea NOT NULL CHECK (octet_length(secret_sha256) = 32),
    created_at     timestamptz NOT NULL DEFAULT now(),
    revoked_at     timestamptz,
    revoked_reason short_text,
    CHECK ((status = 'revoked') = (revoked_at IS NOT NULL))
);

-- A server-issued, single-use, short-lived nonce and the exact text it asks a wallet to
-- sign: a signature over it cannot be replayed for another meter, integrator or moment.
CREATE TABLE wallet_challenges (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    purpose    text NOT NULL CHECK (purpose IN ('link-wallet', 'consent', 'consent-revoke')),
    account_id account_id NOT NULL,
    meter_id   text,
    document   text NOT NULL CHECK (char_length(document) <= 4096),
    issued_at  timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL CHECK (expires_at > issued_at),
    used_at    timestamptz
);

-- Who owns a meter, proven twice (the wallet's signature and the meter's), with history.
CREATE TABLE wallet_links (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    meter_id         text NOT NULL REFERENCES meters (meter_id),
    account_id       account_id NOT NULL,
    challenge        uuid NOT NULL UNIQUE REFERENCES wallet_challenges (id),
    wallet_signature text NOT NULL CHECK (char_length(wallet_signature) <= 512),
    meter_kid        text NOT NULL,
    meter_signature  text NOT NULL CHECK (char_length(meter_signature) <= 1024),
    linked_at        timestamptz NOT NULL DEFAULT now(),
    unlinked_at      timestamptz CHECK (unlinked_at >= linked_at),
    unlinked_by      text,
    unlink_reason    short_text,
    CHECK ((unlinked_at IS NULL) = (unlinked_by IS NULL))
);

CREATE UNIQUE INDEX wallet_links_current ON wallet_links (meter_id) WHERE unlinked_at IS NULL;
CREATE INDEX wallet_links_account ON wallet_links (account_id) WHERE unlinked_at IS NULL;

-- meters.owner_wallet (who receives future mints) follows the current link, in the same
-- transaction: the bridge reads that column when it seals an epoch.
CREATE FUNCTION meterproof_owner_follows_link() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE meters SET owner_wallet = (
        SELECT l.account_id FROM wallet_links l
        WHERE l.meter_id = NEW.meter_id AND l.unlinked_at IS NULL
    ) WHERE meter_id = NEW.meter_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER wallet_links_owner AFTER INSERT OR UPDATE OF unlinked_at ON wallet_links
    FOR EACH ROW EXECUTE FUNCTION meterproof_owner_follows_link();

CREATE TABLE consents (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    integrator      text NOT NULL REFERENCES integrators (name),
    -- One meter, or every meter currently linked to one wallet.
    meter_id        text REFERENCES meters (meter_id),
    account_id      account_id,
    scopes          text[] NOT NULL
                    CHECK (cardinality(scopes) BETWEEN 1 AND 3
                           AND scopes <@ ARRAY['live', 'history', 'ledger']),
    -- The period of data covered, by reading time: [data_from, data_to).
    data_from       timestamptz NOT NULL,
    data_to         timestamptz CHECK (data_to > data_from),
    expires_at      timestamptz,
    -- 'operator', or the account id whose signature granted it.
    granted_by      text NOT NULL,
    operator_reason short_text,
    challenge       uuid UNIQUE REFERENCES wallet_challenges (id),
    signature       text CHECK (char_length(signature) <= 512),
    granted_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((meter_id IS NULL) <> (account_id IS NULL)),
    CHECK ((granted_by = 'operator') = (operator_reason IS NOT NULL)),
    CHECK ((granted_by = 'operator') = (signature IS NULL)),
    CHECK ((signature IS NULL) = (challenge IS NULL)),
    CHECK (expires_at > granted_at)
);

CREATE INDEX consents_integrator ON consents (integrator);
CREATE INDEX consents_meter ON consents (meter_id) WHERE meter_id IS NOT NULL;
CREATE INDEX consents_account ON consents (account_id) WHERE account_id IS NOT NULL;

CREATE TABLE consent_events (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- NULL only for a refused grant: there is no consent to point at.
    consent  uuid REFERENCES consents (id),
    event    text NOT NULL CHECK (event IN ('granted', 'revoked', 'expired', 'refused')),
    actor    text NOT NULL CHECK (char_length(actor) BETWEEN 1 AND 160),
    reason   reason_code NOT NULL,
    detail   jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(detail) = 'object'),
    at       timestamptz NOT NULL DEFAULT now(),
    CHECK (consent IS NOT NULL OR event = 'refused')
);

-- A consent is granted once, ends once (revoked or expired, whichever is recorded first).
CREATE UNIQUE INDEX consent_events_granted ON consent_events (consent) WHERE event = 'granted';
CREATE UNIQUE INDEX consent_events_ended ON consent_events (consent)
    WHERE event IN ('revoked', 'expired');
CREATE INDEX consent_events_at ON consent_events (at);

CREATE FUNCTION meterproof_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER consents_append_only BEFORE UPDATE OR DELETE ON consents
    FOR EACH ROW EXECUTE FUNCTION meterproof_append_only();
CREATE TRIGGER consent_events_append_only BEFORE UPDATE OR DELETE ON consent_events
    FOR EACH ROW EXECUTE FUNCTION meterproof_append_only();

CREATE VIEW consent_state AS
SELECT c.*,
       e.event AS ended,
       e.at AS ended_at,
       CASE
           WHEN e.event IS NOT NULL THEN e.event
           WHEN c.expires_at <= now() THEN 'expired'
           ELSE 'active'
       END AS status
FROM consents c
LEFT JOIN consent_events e ON e.consent = c.id AND e.event IN ('revoked', 'expired');

-- Every cache of who may see what (workers' live audiences, the API) reloads after commit.
CREATE FUNCTION meterproof_notify_consents() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('meterproof_consents', TG_TABLE_NAME);
    RETURN NULL;
END
$$;

CREATE TRIGGER integrators_notify AFTER INSERT OR UPDATE ON integrators
    FOR EACH STATEMENT EXECUTE FUNCTION meterproof_notify_consents();
CREATE TRIGGER wallet_links_notify AFTER INSERT OR UPDATE ON wallet_links
    FOR EACH STATEMENT EXECUTE FUNCTION meterproof_notify_consents();
CREATE TRIGGER consents_notify AFTER INSERT ON consents
    FOR EACH STATEMENT EXECUTE FUNCTION meterproof_notify_consents();
CREATE TRIGGER consent_events_notify AFTER INSERT ON consent_events
    FOR EACH STATEMENT EXECUTE FUNCTION meterproof_notify_consents();
