"""Seed 003's provider format through the one pipeline, against a real `meterproof api`
(tests/fixtures/api.py) on the session's PostgreSQL, Redis and Mosquitto: registration,
accepted readings stored, anchored and minted, every refusal with the seed's status and
our stable code, a third party re-verifying a stored reading from its kept bytes, and
HTTP-submitted readings on the MQTT verified feed (also across a broker restart)."""

from __future__ import annotations

import base64
import hashlib
import re
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import paho.mqtt.client as mqtt
import psycopg
import pytest
from bridge_harness import Clock, in_process
from fixtures.api import ApiServer, signed
from ingest_harness import end_session, provision, tls_context
from nacl.signing import SigningKey, VerifyKey
from paho.mqtt.enums import CallbackAPIVersion
from psycopg import sql
from pydantic import ValidationError
from waiting import wait_until

from meterproof.api.settings import ApiSettings
from meterproof.bridge.oracle import load_oracle
from meterproof.bridge.proof import check_proof
from meterproof.bridge.rehash import reading_hash as rehash
from meterproof.bridge.verify import verify as verify_ledger
from meterproof.certs.bootstrap import init_pki
from meterproof.certs.identities import load_identity
from meterproof.certs.layout import IdentityFiles, PkiLayout
from meterproof.consent import repository as consents
from meterproof.consent.model import Scope
from meterproof.schemas import provider
from meterproof.schemas.timestamps import wall_ms
from meterproof.stack.broker import BrokerServer

RATE_PER_MIN = 40


@pytest.fixture(scope="module")
def api_env() -> dict[str, str]:
    """No METERPROOF_API_MQTT_IDENTITY: the API republishes as `api`, which the PKI has."""
    return {"METERPROOF_API_RATE_PROVIDER_PER_MIN": str(RATE_PER_MIN)}


# -- the pure contract: a worked vector ---------------------------------------------------

#: Seed 003's example reading, signed by the Ed25519 key whose seed is 32 bytes of 0x01.
VECTOR_KEY = SigningKey(bytes([1]) * 32)
VECTOR = {"provider_id": "provider_usa_001", "meter_address": "meter_smart_001",
          "total_kwh": 1500000, "timestamp": 1702944000, "nonce": 12345}  # fmt: skip
VECTOR_BYTES = (
    "70726f76696465725f7573615f303031"  # provider_usa_001
    "6d657465725f736d6172745f303031"  # meter_smart_001
    "60e3160000000000"  # 1500000 u64 LE
    "00dd806500000000"  # 1702944000 u64 LE
    "3930000000000000"  # 12345 u64 LE
)
VECTOR_SIGNATURE = (
    "MHXT8ZOFCZ6TsYXb+mkKrkqFd3aONLXLaC76nMdKFKyYmu50UnlkWD11c83G74JASsdz7FG0hS/WnrvuLQoyBg=="
)
VECTOR_LEAF = "3663a4137492b7965eee2775bfb489f23e0945a3466985da79f8acdac4c5b75a"


def test_the_signing_bytes_of_seed_003_worked_vector() -> None:
    message = provider.signing_bytes(**VECTOR)  # type: ignore[arg-type]
    assert message.hex() == VECTOR_BYTES
    # the seed's own recipe, written out independently
    seed_recipe = (
        b"provider_usa_001" + b"meter_smart_001"
        + struct.pack("<Q", 1500000) + struct.pack("<Q", 1702944000) + struct.pack("<Q", 12345)
    )  # fmt: skip
    assert message == seed_recipe
    signature = base64.b64encode(VECTOR_KEY.sign(message).signature).decode()
    assert signature == VECTOR_SIGNATURE  # Ed25519 is deterministic (RFC 8032)
    body = orjson.dumps({**VECTOR, "signature": signature})
    parsed = provider.parse(body)
    assert provider.reading_signing_bytes(parsed) == message
    reading = provider.as_reading(parsed)
    assert (reading.meter_id, reading.seq, reading.ts) == ("meter_smart_001", 12345, 1702944000000)
    assert (reading.import_wh, reading.export_wh, reading.kid) == (
        0,
        1500000000,
        "provider_usa_001",
    )
    # the ledger's leaf: reading-v1's SHA-256 of the mapped fields' signing bytes (SMR1)
    smr1 = (
        b"SMR1" + bytes((15,)) + b"meter_smart_001"
        + struct.pack(">QQQQB", 12345, 1702944000000, 0, 1500000000, 0)
    )  # fmt: skip
    assert hashlib.sha256(smr1).hexdigest() == VECTOR_LEAF
    assert rehash("meter_smart_001", (12345, 1702944000000, 0, 1500000000), (None,) * 5).hex() == (
        VECTOR_LEAF
    )
    with pytest.raises(ValueError, match="given twice"):
        provider.parse(body[:-1] + b',"nonce":1}')
    with pytest.raises(ValueError, match="total_kwh"):
        provider.parse(orjson.dumps({**VECTOR, "signature": signature, "total_kwh": 2**64 - 1}))


# -- helpers ------------------------------------------------------------------------------


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _problem(answer: Any, status: int, code: str, error: str | None = None) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = answer.json()
    assert body["code"] == code, body
    if error is not None:
        assert body["error"] == error, body
    return body


class Provider:
    """A provider as seed 003 describes it: an id, a meter, an Ed25519 key."""

    def __init__(self, provider_id: str, meter: str, key: SigningKey | None = None) -> None:
        self.provider_id = provider_id
        self.meter = meter
        self.key = key or SigningKey.generate()

    def registration(self, **overrides: Any) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "provider_id": self.provider_id, "owner": "ct1qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqe4tqx9",
            "location": "US-CA", "capacity_kwh": 1000000, "price_per_kwh": 5000,
            "meter_address": self.meter, "stake_amount_ct": 500000,
            "public_key": base64.b64encode(bytes(self.key.verify_key)).decode(),
            "signature": "A" * 86 + "==",
        }  # fmt: skip
        fields.update(overrides)
        message = provider.registration_bytes(provider.ProviderRegistration(**fields))
        fields["signature"] = base64.b64encode(self.key.sign(message).signature).decode()
        return fields

    def reading(
        self, total_kwh: int, nonce: int, *, timestamp: int | None = None,
        key: SigningKey | None = None, provider_id: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        fields = {
            "provider_id": provider_id or self.provider_id, "meter_address": self.meter,
            "total_kwh": total_kwh, "timestamp": timestamp or wall_ms() // 1000, "nonce": nonce,
        }  # fmt: skip
        message = provider.signing_bytes(**fields)  # type: ignore[arg-type]
        signature = (key or self.key).sign(message).signature
        return {**fields, "signature": base64.b64encode(signature).decode()}


def _register(api: ApiServer, make_meter_id: Callable[[], str]) -> Provider:
    meter = make_meter_id()
    p = Provider(f"prov-{meter[-12:]}", meter)
    with api.client() as http:
        answer = http.post("/energy/provider/register", json=p.registration(),
                           headers=_bearer(api.operator_token()))  # fmt: skip
    assert answer.status_code == 201, answer.text
    return p


def _submit(api: ApiServer, body: dict[str, Any]) -> Any:
    with api.client() as http:
        return http.post("/energy/reading/submit", json=body)


def _stored(api: ApiServer, meter: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(api.database_url, autocommit=True) as conn:
        return conn.execute(
            "SELECT seq, export_wh, kid FROM readings WHERE meter_id = %s ORDER BY seq", (meter,)
        ).fetchall()


# -- registration -------------------------------------------------------------------------


def test_operators_register_providers_with_a_proof_of_their_key(
    api_server: ApiServer, make_meter_id: Callable[[], str]
) -> None:
    meter = make_meter_id()
    p = Provider(f"prov-{meter[-12:]}", meter)
    operator = _bearer(api_server.operator_token())
    with api_server.client() as http:
        _problem(http.post("/energy/provider/register", json=p.registration()), 401,
                 "unauthenticated")  # fmt: skip
        forged = {**p.registration(), "location": "US-TX"}  # signed for US-CA
        _problem(http.post("/energy/provider/register", json=forged, headers=operator), 422,
                 "bad_signature", "signature_verification_failed")  # fmt: skip
        missing = {k: v for k, v in p.registration().items() if k != "owner"}
        _problem(http.post("/energy/provider/register", json=missing, headers=operator), 400,
                 "invalid_request")  # fmt: skip
        answer = http.post("/energy/provider/register", json=p.registration(), headers=operator)
        assert answer.status_code == 201, answer.text
        body = answer.json()
        assert body["provider_id"] == p.provider_id
        assert body["status"] == "active"
        assert body["stake_amount_ct"] == 500000
        assert abs(body["registered_at"] - time.time()) < 60
        _problem(http.post("/energy/provider/register", json=p.registration(), headers=operator),
                 409, "provider_exists")  # fmt: skip
        other = Provider(f"other-{meter[-12:]}", make_meter_id(), key=p.key)
        _problem(http.post("/energy/provider/register", json=other.registration(),
                           headers=operator), 409, "key_registered")  # fmt: skip
        taken = Provider(f"third-{meter[-12:]}", meter)
        _problem(http.post("/energy/provider/register", json=taken.registration(),
                           headers=operator), 409, "meter_exists")  # fmt: skip
        record = http.get(f"/api/meters/{meter}", headers=operator).json()
        assert record["status"] == "active"


# -- submissions --------------------------------------------------------------------------


def test_good_readings_are_stored_anchored_minted_and_reverifiable(
    api_server: ApiServer, make_meter_id: Callable[[], str]
) -> None:
    p = _register(api_server, make_meter_id)
    now_s = wall_ms() // 1000
    first = _submit(api_server, p.reading(100, 1, timestamp=now_s - 60))
    assert first.status_code == 202, first.text
    second = _submit(api_server, p.reading(150, 2, timestamp=now_s - 30))
    assert second.status_code == 202, second.text
    body = second.json()
    assert body["status"] == "pending_settlement"
    assert body["credit_amount_kwh"] == 50
    assert body["receipt"]["status"] == "accepted"
    digest = body["reading_hash"].removeprefix("0x")
    assert digest == body["receipt"]["reading_hash"]
    assert _stored(api_server, p.meter) == [
        (1, 100_000, p.provider_id),
        (2, 150_000, p.provider_id),
    ]

    # anchored: the bridge seals the readings like any other, the ledger verifies
    oracle = load_oracle(api_server.pki.oracle_key)
    runner = in_process(api_server.database_url, oracle, Clock(wall_ms() + 10_000))
    runner.run_once()
    runner.close()
    operator = _bearer(api_server.operator_token())
    with api_server.client() as http:
        proof = http.get(f"/api/ledger/proofs/{digest}", headers=operator)
        assert proof.status_code == 200, proof.text
        assert check_proof(proof.json(), trusted_key=oracle.public_key).tree_size >= 1
        kept = http.get(f"/energy/reading/0x{digest}", headers=operator)
        assert kept.status_code == 200, kept.text
        _problem(http.get(f"/energy/reading/{digest}"), 401, "unauthenticated")
    with (
        psycopg.connect(api_server.database_url, autocommit=True) as conn,
        psycopg.connect(api_server.database_url, autocommit=True) as ledger,
    ):
        report = verify_ledger(conn, ledger, oracle.public_key)
        assert report.discrepancy is None, str(report.discrepancy)
        minted = conn.execute(
            "SELECT sum(export_delta_wh) FROM ledger_mints WHERE meter_id = %s", (p.meter,)
        ).fetchone()
    assert minted is not None
    assert int(minted[0]) == 50_000  # the first reading is the baseline

    # a third party: the kept bytes, checked with nothing of ours but the documented mapping
    k = kept.json()
    signed_bytes = base64.b64decode(k["signed_bytes"])
    VerifyKey(base64.b64decode(k["public_key"])).verify(
        signed_bytes, base64.b64decode(k["signature"])
    )  # raises if forged
    assert signed_bytes == (
        k["provider_id"].encode() + k["meter_address"].encode()
        + struct.pack("<QQQ", k["total_kwh"], k["timestamp"], k["nonce"])
    )  # fmt: skip
    assert (k["total_kwh"], k["nonce"]) == (150, 2)
    assert base64.b64decode(k["public_key"]) == bytes(p.key.verify_key)
    smr1 = (
        b"SMR1" + bytes((len(k["meter_address"]),)) + k["meter_address"].encode()
        + struct.pack(">QQQQB", k["nonce"], k["timestamp"] * 1000, 0, k["total_kwh"] * 1000, 0)
    )  # fmt: skip
    assert hashlib.sha256(smr1).hexdigest() == digest == proof.json()["reading_hash"]


def test_refusals_get_the_seed_statuses_and_our_codes(
    api_server: ApiServer, make_meter_id: Callable[[], str]
) -> None:
    p = _register(api_server, make_meter_id)
    now_s = wall_ms() // 1000
    good = p.reading(500, 10, timestamp=now_s - 100)
    assert _submit(api_server, good).status_code == 202

    cases = [
        ("bad signature", p.reading(510, 11, key=SigningKey.generate()), 422, "bad_signature",
         "signature_verification_failed"),
        ("tampered total", {**p.reading(510, 11), "total_kwh": 9999}, 422, "bad_signature",
         "signature_verification_failed"),
        ("301 s ahead", p.reading(510, 11, timestamp=now_s + 400), 422, "timestamp_skew",
         "timestamp_skew"),
        ("400 s old", p.reading(510, 11, timestamp=now_s - 400), 422, "timestamp_skew",
         "timestamp_skew"),
        ("total decreased", p.reading(499, 11, timestamp=now_s - 50), 422,
         "register_decreased", "meter_anomaly"),
        ("nonce reused, other reading", p.reading(520, 10, timestamp=now_s - 40), 422,
         "seq_reused", "nonce_reused"),
        ("nonce below the last", p.reading(520, 9, timestamp=now_s - 40), 422, "seq_reused",
         "nonce_reused"),
        ("the same reading again", good, 422, "duplicate", "nonce_reused"),
        ("unknown provider", p.reading(520, 11, provider_id="nobody"), 422, "unsupported_alg",
         "signature_verification_failed"),
        ("malformed", {**p.reading(520, 11), "nonce": -1}, 400, "malformed",
         "malformed_request"),
        ("unknown field", {**p.reading(520, 11), "extra": 1}, 400, "malformed",
         "malformed_request"),
    ]  # fmt: skip
    for name, body, status, code, error in cases:
        answer = _submit(api_server, body)
        assert answer.status_code == status, f"{name}: {answer.text}"
        got = _problem(answer, status, code, error)
        if code == "duplicate":
            assert (got["receipt"]["status"], got["receipt"]["reason"]) == ("duplicate", None)
        elif status == 422:
            assert (got["receipt"]["status"], got["receipt"]["reason"]) == ("rejected", code)
    stranger = Provider("nobody-at-all", make_meter_id())
    _problem(_submit(api_server, stranger.reading(1, 1)), 422, "unknown_meter",
             "provider_inactive")  # fmt: skip
    assert _stored(api_server, p.meter) == [(10, 500_000, p.provider_id)]  # nothing else
    with api_server.client() as http:
        http.post(f"/api/meters/{p.meter}/quarantine", json={"reason": "test"},
                  headers=_bearer(api_server.operator_token()))  # fmt: skip
    nonces = iter(range(12, 100))
    wait_until(
        lambda: (
            _submit(api_server, p.reading(530, next(nonces))).json().get("code")
            == "meter_not_active"
        ),
        what="the quarantined provider's readings are refused",
    )
    got = _problem(_submit(api_server, p.reading(540, 100)), 422, "meter_not_active",
                   "provider_inactive")  # fmt: skip
    assert got["reason"] == "inactive"
    assert 100 not in [seq for seq, _, _ in _stored(api_server, p.meter)]
    with psycopg.connect(api_server.database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT reason, meter_id FROM rejected_readings WHERE topic = %s",
            (f"providers/{p.meter}/readings",),
        ).fetchall()
        events = {r[0] for r in conn.execute(
            "SELECT type FROM security_events WHERE meter_id = %s", (p.meter,))}  # fmt: skip
    stored_as = dict(rows)
    # refused before the signature proved the provider sent it: not held against its meter
    assert stored_as["bad_signature"] is None
    assert stored_as["unsupported_alg"] is None
    assert stored_as["meter_not_active"] is None
    assert not {"bad_signature", "unsupported_alg", "inactive_meter_reading"} & events
    # refused after: the provider's own doing, recorded on its meter like a meter's
    for reason in ("timestamp_skew", "register_decreased", "seq_reused"):
        assert stored_as[reason] == p.meter, reason
    assert {"timestamp_skew", "register_decreased", "seq_reused"} <= events


def test_a_provider_over_its_rate_gets_429(
    api_server: ApiServer, make_meter_id: Callable[[], str]
) -> None:
    p = _register(api_server, make_meter_id)
    answers = [_submit(api_server, p.reading(1, n + 1)).status_code for n in range(RATE_PER_MIN)]
    assert 429 not in answers
    refused = _submit(api_server, p.reading(1, RATE_PER_MIN + 1))
    _problem(refused, 429, "rate_limited")
    assert int(refused.headers["retry-after"]) > 0
    assert refused.headers["x-ratelimit-limit"] == str(RATE_PER_MIN)


#: What an operator's trigger may do: refuse one meter's nonce 13 (SQLSTATE P0001).
_REFUSE_13 = """
CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.meter_id = {meter} AND NEW.seq = 13 THEN RAISE EXCEPTION 'nonce 13 refused'; END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER {function} BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION {function}();
"""


@pytest.mark.parametrize("table", ["readings", "provider_readings"])
def test_a_reading_the_database_refuses_is_answered_store_refused_and_the_rest_commits(
    api_server: ApiServer, make_meter_id: Callable[[], str], table: str
) -> None:
    """The poison-batch guard (ingest/store.py) on the provider path, whether the database
    refuses the reading's rows or its kept bytes: that reading is parked and answered
    `store_refused`, as on MQTT; the rest of its batch and later readings commit."""
    p, q = _register(api_server, make_meter_id), _register(api_server, make_meter_id)
    function = sql.Identifier(f"refuse_{uuid.uuid4().hex}")
    refuse = sql.SQL(_REFUSE_13).format(
        function=function, meter=sql.Literal(p.meter), table=sql.Identifier(table)
    )
    with psycopg.connect(api_server.database_url, autocommit=True) as conn:
        conn.execute(refuse)
    now_s = wall_ms() // 1000
    try:
        with ThreadPoolExecutor(2) as pool:  # at once: most likely one batch
            refused, other = pool.map(
                lambda body: _submit(api_server, body),
                [p.reading(100, 13, timestamp=now_s - 30), q.reading(100, 1, timestamp=now_s - 30)],
            )
        later = _submit(api_server, p.reading(110, 14, timestamp=now_s - 20))
    finally:
        with psycopg.connect(api_server.database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP FUNCTION {} CASCADE").format(function))
    got = _problem(refused, 422, "store_refused", "meter_anomaly")
    assert (got["receipt"]["status"], got["receipt"]["reason"]) == ("rejected", "store_refused")
    assert other.status_code == 202, other.text
    assert later.status_code == 202, later.text
    assert _stored(api_server, p.meter) == [(14, 110_000, p.provider_id)]
    assert _stored(api_server, q.meter) == [(1, 100_000, q.provider_id)]
    with psycopg.connect(api_server.database_url, autocommit=True) as conn:
        kept = conn.execute(
            "SELECT meter_id, seq FROM provider_readings WHERE meter_id = ANY(%s)",
            ([p.meter, q.meter],),
        ).fetchall()
        parked = conn.execute(
            "SELECT reason, seq, detail FROM rejected_readings WHERE meter_id = %s", (p.meter,)
        ).fetchall()
    assert sorted(kept) == sorted([(p.meter, 14), (q.meter, 1)])
    assert [(reason, seq) for reason, seq, _ in parked] == [("store_refused", 13)]
    assert parked[0][2].startswith("SQLSTATE P0001: nonce 13 refused")


# -- the MQTT verified feed ---------------------------------------------------------------


class Feed:
    """A subscriber to `topic_filter` (by default `verified/#` with the bridge's identity,
    which may read it), in a persistent session, so what is published while it is away is
    kept for it."""

    def __init__(
        self, pki: PkiLayout, port: int, identity: IdentityFiles | None = None,
        topic_filter: str = "verified/#",
    ) -> None:  # fmt: skip
        identity = identity or pki.service("bridge")
        self.identity = identity
        end_session(pki, identity, port)
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._subscribed = threading.Event()
        client_id = identity.directory.name  # the broker makes the CN the client id anyway
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self._client.tls_set_context(tls_context(pki, identity.cert, identity.key))
        self._client.on_connect = lambda c, *_: c.subscribe(topic_filter, qos=1)
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.on_message = lambda _c, _u, m: self.messages.append(
            (m.topic, orjson.loads(m.payload))
        )
        props = mqtt.Properties(mqtt.PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 300
        self._client.reconnect_delay_set(1, 1)
        self._client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self._client.loop_start()
        assert self._subscribed.wait(10), "no SUBACK"

    def hashes(self, meter: str, prefix: str = "") -> set[str]:
        topic = f"{prefix}verified/{meter}/readings"
        return {m["reading_hash"] for t, m in list(self.messages) if t == topic}

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def feed(api_server: ApiServer, broker: BrokerServer) -> Iterator[Feed]:
    subscriber = Feed(api_server.pki, broker.port)
    yield subscriber
    subscriber.close()
    end_session(api_server.pki, subscriber.identity, broker.port)


def test_http_readings_arrive_on_the_mqtt_verified_feed(
    api_server: ApiServer, make_meter_id: Callable[[], str], feed: Feed
) -> None:
    meter = make_meter_id()
    key = provision(api_server.pki, api_server.database_url, meter)
    with api_server.meter_client(meter) as http:
        receipt = http.post(f"/api/meters/{meter}/energy", content=signed(meter, key, 1, wall_ms()))
    assert receipt.status_code == 200, receipt.text
    p = _register(api_server, make_meter_id)
    accepted = _submit(api_server, p.reading(7, 1))
    assert accepted.status_code == 202, accepted.text
    wait_until(lambda: receipt.json()["reading_hash"] in feed.hashes(meter),
               what="the meter's HTTP reading on verified/{meter}/readings")  # fmt: skip
    provider_hash = accepted.json()["receipt"]["reading_hash"]
    wait_until(lambda: provider_hash in feed.hashes(p.meter),
               what="the provider's reading on verified/{meter}/readings")  # fmt: skip
    copy = next(m for t, m in feed.messages if m["reading_hash"] == provider_hash)
    assert copy["provider_id"] == p.provider_id  # the seed-003 body as received, verified
    assert _refused_none(api_server)


def test_an_integrators_consented_feed_gets_http_readings(
    api_server: ApiServer, make_meter_id: Callable[[], str], broker: BrokerServer,
    integrator_name: str,
) -> None:  # fmt: skip
    pki, name = api_server.pki, integrator_name
    files = pki.integrator(name)
    consented, other = _register(api_server, make_meter_id), _register(api_server, make_meter_id)
    with psycopg.connect(api_server.database_url, autocommit=True) as conn:
        consents.add_integrator(conn, name, cert_serial=load_identity(files).serial)
        consents.grant(conn, consents.GrantRequest(
            integrator=name, meter_id=consented.meter, account=None,
            scopes=frozenset({Scope.LIVE}), data_from=datetime(2026, 1, 1, tzinfo=UTC),
            data_to=None, expires_at=None,
        ), operator_reason="test")  # fmt: skip
    prefix = f"integrators/{name}/"
    feed = Feed(pki, broker.port, files, topic_filter=f"{prefix}verified/#")
    try:
        nonces = iter(range(1, 100))

        def arrives() -> bool:  # until the API's consent view has heard of the grant
            answer = _submit(api_server, consented.reading(1, next(nonces)))
            assert answer.status_code == 202, answer.text
            time.sleep(0.3)
            return answer.json()["receipt"]["reading_hash"] in feed.hashes(consented.meter, prefix)

        wait_until(arrives, what="the consented meter's reading on the integrator's feed")
        unconsented = _submit(api_server, other.reading(1, 1))
        assert unconsented.status_code == 202, unconsented.text
        last = _submit(api_server, consented.reading(2, 100))  # published after the other
        wait_until(lambda: last.json()["receipt"]["reading_hash"]
                   in feed.hashes(consented.meter, prefix), what="the last reading")  # fmt: skip
        assert not feed.hashes(other.meter, prefix)
    finally:
        feed.close()
        end_session(pki, files, broker.port)


@pytest.mark.slow
def test_readings_submitted_while_the_broker_is_away_are_published_when_it_is_back(
    api_server: ApiServer, make_meter_id: Callable[[], str], broker: BrokerServer, feed: Feed
) -> None:
    p = _register(api_server, make_meter_id)
    broker.stop()
    try:
        answers = [_submit(api_server, p.reading(10 + n, n + 1)) for n in range(3)]
        assert [a.status_code for a in answers] == [202, 202, 202]  # HTTP does not wait for it
        assert _pending(api_server) >= 3  # held until the broker acknowledges them
    finally:
        broker.start()
    hashes = {a.json()["receipt"]["reading_hash"] for a in answers}
    wait_until(lambda: hashes <= feed.hashes(p.meter), within_s=60,
               what="the three readings on the feed after the broker came back")  # fmt: skip
    wait_until(lambda: _pending(api_server) == 0, what="nothing left queued")


def test_the_api_republishes_as_api_once_the_pki_has_it(tmp_path: Path) -> None:
    """Unset, the identity is `api` when issued, else none (a PKI older than it); set, it
    is the one named, which must be `api` or an ingest worker identity."""
    pki = PkiLayout(tmp_path / "pki")
    settings = ApiSettings(pki_root=pki.root)
    assert settings.republish_identity() is None
    init_pki(pki, ca_key="ec-p384")
    assert settings.republish_identity() == "api"
    assert ApiSettings(pki_root=pki.root, api_mqtt_identity="ingest-3").republish_identity() == (
        "ingest-3"
    )
    for wrong in ("bridge", "admin", "api-1", "ingest-01", "meter-1"):
        with pytest.raises(ValidationError):
            ApiSettings(pki_root=pki.root, api_mqtt_identity=wrong)


def _pending(api: ApiServer) -> float:
    """Queued for any broker (one gauge per broker)."""
    text = httpx.get(api.metrics_url, timeout=10).text
    found = re.findall(r"^meterproof_api_republish_pending\{[^}]*\} (\S+)$", text, re.MULTILINE)
    assert found, "the API exports meterproof_api_republish_pending"
    return sum(float(value) for value in found)


def _refused_none(api: ApiServer) -> bool:
    """The API's broker connection was never refused a publish (its ACL rights)."""
    return "broker_refused_publish" not in api.log.read_text()
