"""Rules 1-6 as pure functions, driven by the shared rejection vectors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from meterproof.ingest.decode import Decoded, decode
from meterproof.ingest.records import Candidate, Message, Rejection
from meterproof.ingest.verify import TimeBounds, verify
from meterproof.registry.snapshots import MeterSnapshot, RegisteredKey
from meterproof.schemas.reading import RejectReason
from meterproof.schemas.signatures import generate_private_key, load_public_key

VECTORS = Path(__file__).parent.parent / "schemas" / "vectors"
REJECTIONS: dict[str, Any] = json.loads((VECTORS / "rejections.json").read_text())
SIGNED: dict[str, Any] = json.loads((VECTORS / "signed-readings.json").read_text())
NOW = REJECTIONS["server_time_ms"]


def _registry() -> MeterSnapshot:
    key = load_public_key(REJECTIONS["alg"], REJECTIONS["public_key_pem"])
    return MeterSnapshot(REJECTIONS["meter_id"], "active", (RegisteredKey("k1", key, 0, None),))


def _run(topic: str, payload: str, meter: MeterSnapshot | None) -> Candidate | Rejection:
    decoded = decode(Message(topic, payload.encode(), NOW))
    if isinstance(decoded, Rejection):
        return decoded
    return verify(decoded, meter, now_ms=NOW, bounds=TimeBounds())


@pytest.mark.parametrize("case", [pytest.param(c, id=c["name"]) for c in REJECTIONS["cases"]])
def test_every_rejection_vector_gives_its_reason(case: dict[str, Any]) -> None:
    outcome = _run(case["topic"], case["payload"], _registry())
    assert isinstance(outcome, Rejection), outcome
    assert outcome.reason == RejectReason(case["reason"])


def test_the_valid_vector_passes_all_six_rules() -> None:
    vector = SIGNED["keys"][0]["vectors"][0]
    outcome = _run(vector["topic"], vector["payload"], _registry())
    assert isinstance(outcome, Candidate)
    assert outcome.reading_hash.hex() == vector["reading_hash"]


def test_unknown_and_inactive_meters() -> None:
    vector = SIGNED["keys"][0]["vectors"][0]
    unknown = _run(vector["topic"], vector["payload"], None)
    assert isinstance(unknown, Rejection)
    assert unknown.reason is RejectReason.UNKNOWN_METER
    for status in ("quarantined", "decommissioned", "pending_registration", "compromised"):
        meter = _registry()
        inactive = _run(
            vector["topic"], vector["payload"], MeterSnapshot(meter.meter_id, status, meter.keys)
        )
        assert isinstance(inactive, Rejection)
        assert inactive.reason is RejectReason.METER_NOT_ACTIVE


def test_rotation_overlap_and_expired_key() -> None:
    vector = SIGNED["keys"][0]["vectors"][0]
    good = _registry().keys[0]
    other = generate_private_key("EdDSA").public_key()
    expired = RegisteredKey("old", good.key, 0, NOW - 1)
    meter = MeterSnapshot(REJECTIONS["meter_id"], "active", (expired,))
    outcome = _run(vector["topic"], vector["payload"], meter)
    assert isinstance(outcome, Rejection)
    assert outcome.reason is RejectReason.UNSUPPORTED_ALG
    overlap = MeterSnapshot(
        REJECTIONS["meter_id"], "active", (RegisteredKey("new", other, 0, None), good)
    )
    assert isinstance(_run(vector["topic"], vector["payload"], overlap), Candidate)


def test_algorithm_confusion_es256_against_an_ed25519_key() -> None:
    es = SIGNED["keys"][1]
    vector = es["vectors"][0]
    decoded = decode(Message(vector["topic"], vector["payload"].encode(), NOW))
    assert isinstance(decoded, Decoded)
    meter = MeterSnapshot(decoded.reading.meter_id, "active", (_registry().keys[0],))
    outcome = verify(decoded, meter, now_ms=NOW, bounds=TimeBounds())
    assert isinstance(outcome, Rejection)
    assert outcome.reason is RejectReason.UNSUPPORTED_ALG
