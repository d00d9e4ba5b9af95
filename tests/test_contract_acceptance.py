"""Acceptance rules 1 to 5 at their edges, as the shared contract orders them
(/work/shared/spec/reading-v1.md section 5, docs/spec/reading-v1.md section 9): a value
the contract does not limit is judged by the rule that names it, not refused as
`malformed`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from meterproof.ingest.decode import decode
from meterproof.ingest.records import Candidate, Message, Rejection
from meterproof.ingest.verify import TimeBounds, verify
from meterproof.registry.snapshots import MeterSnapshot, RegisteredKey
from meterproof.schemas.reading import MAX_PAYLOAD_BYTES, RejectReason
from meterproof.schemas.signatures import load_public_key

VECTORS = Path(__file__).parent.parent / "schemas" / "vectors"
REJECTIONS: dict[str, Any] = json.loads((VECTORS / "rejections.json").read_text())
SIGNED: dict[str, Any] = json.loads((VECTORS / "signed-readings.json").read_text())
NOW = REJECTIONS["server_time_ms"]
VALID = SIGNED["keys"][0]["vectors"][0]  # signed by the key rejections.json registers


def _meter() -> MeterSnapshot:
    key = load_public_key(REJECTIONS["alg"], REJECTIONS["public_key_pem"])
    return MeterSnapshot(REJECTIONS["meter_id"], "active", (RegisteredKey("k1", key, 0, None),))


def _judge(changes: dict[str, Any], meter: MeterSnapshot | None) -> Candidate | Rejection:
    payload = json.dumps({**json.loads(VALID["payload"]), **changes}).encode()
    decoded = decode(Message(VALID["topic"], payload, NOW))
    if isinstance(decoded, Rejection):
        return decoded
    return verify(decoded, meter, now_ms=NOW, bounds=TimeBounds())


def _reason(changes: dict[str, Any], meter: MeterSnapshot | None = None) -> RejectReason:
    outcome = _judge(changes, _meter() if meter is None else meter)
    assert isinstance(outcome, Rejection), outcome
    return outcome.reason


@pytest.mark.parametrize("alg", ["A" * 17, "eddsa" * 700, "", "EdDSA\x00"])
def test_any_unknown_alg_is_unsupported_not_malformed(alg: str) -> None:
    """The contract gives `alg` no length: no registered key matches it (rule 4)."""
    outcome = _judge({"alg": alg}, _meter())
    assert isinstance(outcome, Rejection)
    assert outcome.reason is RejectReason.UNSUPPORTED_ALG
    assert len(outcome.detail) < 200, "the detail is stored and logged: the alg is cut short"


def test_an_empty_kid_names_no_key() -> None:
    assert _reason({"kid": ""}) is RejectReason.UNSUPPORTED_ALG


def test_kid_and_payload_limits_still_hold() -> None:
    assert _reason({"kid": "k" * 64}) is RejectReason.UNSUPPORTED_ALG
    assert _reason({"kid": "k" * 65}) is RejectReason.MALFORMED
    assert _reason({"alg": "A" * MAX_PAYLOAD_BYTES}) is RejectReason.MALFORMED


def test_a_long_alg_of_an_unknown_meter_is_unknown_meter() -> None:
    """Rule 3 comes before rule 4: a well-formed payload is judged in the contract's order."""
    outcome = _judge({"alg": "X" * 100, "kid": ""}, None)
    assert isinstance(outcome, Rejection)
    assert outcome.reason is RejectReason.UNKNOWN_METER


def test_an_empty_sig_is_a_bad_signature() -> None:
    """`""` is the unpadded base64url of zero bytes: a signature that does not verify, like
    the shared vector "truncated signature", not a malformed payload."""
    assert _reason({"sig": ""}) is RejectReason.BAD_SIGNATURE
