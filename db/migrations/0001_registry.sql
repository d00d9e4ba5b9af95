-- The device registry: meters, their signing keys (several per meter, for rotation
-- without a gap) and the security event log. Fields follow the AMI registry spec.

CREATE TYPE meter_status AS ENUM (
    'pending_registration', 'provisioning', 'active', 'inactive', 'maintenance',
    'firmware_update', 'compromised', 'quarantined', 'decommissioned'
);

CREATE TYPE security_level AS ENUM ('basic', 'standard', 'high', 'critical_infrastructure');

CREATE TYPE security_severity AS ENUM ('info', 'low', 'medium', 'high', 'critical', 'emergency');

-- Descriptive text a person typed: bounded, and free of control characters (a NUL would
-- not even reach PostgreSQL, a newline or an escape sequence would forge log lines).
CREATE DOMAIN short_text AS text CHECK (VALUE !~ '[[:cntrl:]]' AND char_length(VALUE) BETWEEN 1 AND 256);

CREATE TABLE meters (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- reading-v1 section 1; '.' and '..' fit the alphabet but name directories in the PKI.
    meter_id          text NOT NULL UNIQUE
                      CHECK (meter_id ~ '^[A-Za-z0-9._-]{1,64}$' AND meter_id NOT IN ('.', '..')),
    serial            short_text,
    manufacturer      short_text,
    model             short_text,
    firmware_version  short_text,
    hardware_revision short_text,
    status            meter_status NOT NULL DEFAULT 'pending_registration',
    security_level    security_level NOT NULL DEFAULT 'standard',
    owner_wallet      text CHECK (owner_wallet ~ '^[A-Za-z0-9._:-]{1,128}$'),
    location          jsonb CHECK (jsonb_typeof(location) = 'object'),
    capabilities      jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(capabilities) = 'object'),
    security_profile  jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(security_profile) = 'object'),
    cert_fingerprint  text CHECK (cert_fingerprint ~ '^[0-9a-f]{64}$'),
    cert_serial       text CHECK (cert_serial ~ '^[0-9a-f]{1,40}$'),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX meters_status ON meters (status);

CREATE TABLE meter_keys (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    meter          uuid NOT NULL REFERENCES meters (id) ON DELETE CASCADE,
    kid            text NOT NULL CHECK (kid ~ '^[A-Za-z0-9._:-]{1,64}$'),
    alg            text NOT NULL CHECK (alg IN ('EdDSA', 'ES256', 'RS256', 'PS256')),
    public_key_pem text NOT NULL CHECK (public_key_pem LIKE '-----BEGIN PUBLIC KEY-----%'),
    valid_from     timestamptz NOT NULL DEFAULT now(),
    valid_to       timestamptz CHECK (valid_to >= valid_from),
    created_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (meter, kid)
);

CREATE TABLE security_events (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- An open set (authentication_failure, bad_signature, seq_reused, quarantined, ...),
    -- so a new detector needs no migration; the format keeps it usable as a metric label.
    type     text NOT NULL CHECK (type ~ '^[a-z][a-z0-9_]{0,63}$'),
    severity security_severity NOT NULL,
    -- Not a foreign key: events about unknown or malformed identities matter most.
    meter_id text,
    detail   jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(detail) = 'object'),
    at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX security_events_meter_at ON security_events (meter_id, at);

CREATE FUNCTION meterproof_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER meters_updated_at BEFORE UPDATE ON meters
    FOR EACH ROW EXECUTE FUNCTION meterproof_touch_updated_at();

-- Workers cache each meter's status and keys; this tells them, within a second and only
-- after commit, which meter to forget. Inserts count too: a worker may hold a negative
-- cache entry ("unknown meter") for a meter that was just registered.
CREATE FUNCTION meterproof_notify_registry() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    changed text;
BEGIN
    IF TG_TABLE_NAME = 'meters' THEN
        changed := CASE WHEN TG_OP = 'DELETE' THEN OLD.meter_id ELSE NEW.meter_id END;
    ELSE
        -- Gone already when the delete cascades from meters, which notifies by itself.
        SELECT m.meter_id INTO changed FROM meters m
        WHERE m.id = CASE WHEN TG_OP = 'DELETE' THEN OLD.meter ELSE NEW.meter END;
    END IF;
    IF changed IS NOT NULL THEN
        PERFORM pg_notify('meterproof_registry', changed);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER meters_notify_insert_delete AFTER INSERT OR DELETE ON meters
    FOR EACH ROW EXECUTE FUNCTION meterproof_notify_registry();

CREATE TRIGGER meters_notify_status AFTER UPDATE OF status ON meters
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION meterproof_notify_registry();

CREATE TRIGGER meter_keys_notify AFTER INSERT OR UPDATE OR DELETE ON meter_keys
    FOR EACH ROW EXECUTE FUNCTION meterproof_notify_registry();
