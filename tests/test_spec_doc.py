"""docs/spec/reading-v1.md cannot drift from the code: its worked examples are the signing
bytes and `reading_hash` the code computes for the vectors, and its reason table names
every reason code."""

from __future__ import annotations

import json
import re
from pathlib import Path

from meterproof.schemas.codec import decode_reading
from meterproof.schemas.reading import RejectReason, SignedReading
from meterproof.schemas.signing import reading_hash, signing_bytes

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs/spec/reading-v1.md").read_text(encoding="utf-8")
VECTORS = json.loads((ROOT / "schemas/vectors/signed-readings.json").read_text(encoding="utf-8"))

_HEX_BLOCK = re.compile(r"```hex\n(.*?)```", re.DOTALL)
_HASH_LINE = re.compile(r"^`reading_hash` = `([0-9a-f]{64})`$", re.MULTILINE)
_BYTE_ROW = re.compile(r"^\| (\d+) \| (\d+) \| `([0-9a-f]+)` \|", re.MULTILINE)


def _vector(index: int) -> SignedReading:
    return decode_reading(VECTORS["keys"][0]["vectors"][index]["payload"].encode())


def _examples() -> list[tuple[bytes, str, str]]:
    """(signing bytes, reading_hash, the byte table's text) of each worked example."""
    blocks = list(_HEX_BLOCK.finditer(DOC))
    hashes = _HASH_LINE.findall(DOC)
    assert blocks, "no ```hex block in the spec"
    assert len(blocks) == len(hashes), "every worked example needs its reading_hash line"
    out = []
    previous_end = 0
    for block, digest in zip(blocks, hashes, strict=True):
        table = DOC[previous_end : block.start()]
        out.append((bytes.fromhex("".join(block.group(1).split())), digest, table))
        previous_end = block.end()
    return out


def test_worked_example_is_the_first_vector() -> None:
    data, digest, _ = _examples()[0]
    reading = _vector(0)
    assert data == signing_bytes(reading)
    assert digest == reading_hash(signing_bytes(reading)).hex()
    assert f"```json\n{VECTORS['keys'][0]['vectors'][0]['payload']}\n```" in DOC


def test_every_worked_example_is_a_vector_with_its_hash() -> None:
    known = {v["signing_bytes_hex"]: v["reading_hash"] for v in VECTORS["keys"][0]["vectors"]}
    for data, digest, _ in _examples():
        assert known.get(data.hex()) == digest


def test_byte_tables_add_up_to_the_signing_bytes() -> None:
    for data, _, table in _examples():
        rows = _BYTE_ROW.findall(table)
        assert rows, "a worked example without its byte table"
        offset = 0
        for start, size, hex_ in rows:
            assert int(start) == offset
            assert len(hex_) == 2 * int(size)
            offset += int(size)
        assert "".join(hex_ for _, _, hex_ in rows) == data.hex()


def test_reason_table_names_every_reason_code() -> None:
    section = DOC[DOC.index("## 9. ") : DOC.index("## 10. ")]
    table_codes = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.MULTILINE))
    missing = {reason.value for reason in RejectReason} - table_codes
    assert not missing, f"reason codes missing from the spec's reason table: {missing}"
    assert {"accepted", "duplicate"} <= table_codes


def test_the_spec_names_every_pairing_and_vendor_identity_refusal() -> None:
    """Sections 1 and 16 list the reasons registry/pairing.py and conformance/vendor.py
    refuse with: a vendor builds against this page, not against the code."""
    found: set[str] = set()
    for module in ("registry/pairing.py", "registry/wallets.py", "conformance/vendor.py"):
        source = (ROOT / module).read_text(encoding="utf-8")
        found |= set(re.findall(r'Error\(\s*"((?:pairing|vendor|invalid_period)[a-z_]*)"', source))
    assert {"pairing_code_unknown", "vendor_cert_untrusted", "pairing_not_signed"} <= found
    missing = {code for code in found if f"`{code}`" not in DOC}
    assert not missing, f"refusals missing from docs/spec/reading-v1.md: {missing}"


def test_payload_table_states_the_string_limits_the_model_enforces() -> None:
    """Section 4's range column is what the model enforces, as the shared contract sets it:
    `kid` at most 64 characters with no hidden minimum, `alg` without a length limit."""
    props = SignedReading.model_json_schema()["properties"]
    assert "maxLength" not in props["alg"]
    assert "minLength" not in props["kid"]
    row = re.search(r"^\| `kid` \| string \| no \| at most (\d+) characters \|", DOC, re.MULTILINE)
    assert row is not None, "section 4 must give kid's range"
    assert int(row.group(1)) == props["kid"]["maxLength"]
