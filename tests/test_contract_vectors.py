"""The independent implementation's vectors, every one of them (docs/spec/reading-v1.md
sections 6, 14)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from meterproof.schemas.codec import MalformedPayload, decode_reading
from meterproof.schemas.merkle import audit_path, merkle_root, verify_inclusion
from meterproof.schemas.reading import b64url_decode
from meterproof.schemas.signatures import load_private_key, load_public_key
from meterproof.schemas.signing import reading_hash, signing_bytes

VECTORS = Path(__file__).parent.parent / "schemas" / "vectors"


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text(encoding="utf-8"))
    return data


SIGNED = _load("signed-readings.json")
MERKLE = _load("merkle.json")
REJECTIONS = _load("rejections.json")

SIGNED_CASES = [
    pytest.param(key, vector, id=f"{key['alg']}{key['rsa_bits'] or ''}-{n}")
    for key in SIGNED["keys"]
    for n, vector in enumerate(key["vectors"])
]


def test_vector_files_are_the_shared_spec_copies() -> None:
    shared = Path(__file__).parent.parent.parent / "shared" / "spec" / "vectors"
    if not shared.is_dir():
        pytest.skip("shared/ is not beside this checkout")
    for name in ("signed-readings.json", "rejections.json", "merkle.json"):
        assert (VECTORS / name).read_bytes() == (shared / name).read_bytes(), name


def test_every_algorithm_and_size_is_covered() -> None:
    seen = {(k["alg"], k["rsa_bits"]) for k in SIGNED["keys"]}
    assert {alg for alg, _ in seen} == {"EdDSA", "ES256", "RS256", "PS256"}
    assert len(SIGNED_CASES) == 24


@pytest.mark.parametrize(("key", "vector"), SIGNED_CASES)
def test_signing_bytes_and_hash(key: dict[str, Any], vector: dict[str, Any]) -> None:
    reading = decode_reading(vector["payload"].encode())
    message = signing_bytes(reading)
    assert message.hex() == vector["signing_bytes_hex"]
    assert reading_hash(message).hex() == vector["reading_hash"]
    assert vector["topic"] == f"meters/{reading.meter_id}/readings"


@pytest.mark.parametrize(("key", "vector"), SIGNED_CASES)
def test_signature_verifies_and_deterministic_ones_resign(
    key: dict[str, Any], vector: dict[str, Any]
) -> None:
    reading = decode_reading(vector["payload"].encode())
    message = signing_bytes(reading)
    signature = b64url_decode(reading.sig)
    public = load_public_key(key["alg"], key["public_key_pem"])
    private = load_private_key(key["alg"], key["private_key_pem"].encode())
    assert public.verify(signature, message)
    assert not public.verify(signature, message + b"\x00")
    resigned = private.sign(message)
    assert public.verify(resigned, message)
    if vector["deterministic"]:
        assert resigned == signature


MALFORMED_CASES = [
    pytest.param(case, id=case["name"])
    for case in REJECTIONS["cases"]
    if case["reason"] == "malformed"
]


@pytest.mark.parametrize("case", MALFORMED_CASES)
def test_malformed_vectors_are_refused_by_the_codec(case: dict[str, Any]) -> None:
    with pytest.raises(MalformedPayload):
        decode_reading(case["payload"].encode())


def test_other_rejection_vectors_decode() -> None:
    """Their reason comes from a later rule, so the codec must let them through."""
    for case in REJECTIONS["cases"]:
        if case["reason"] != "malformed":
            decode_reading(case["payload"].encode())


MERKLE_CASES = [pytest.param(tree, id=f"n={tree['n']}") for tree in MERKLE["trees"]]


@pytest.mark.parametrize("tree", MERKLE_CASES)
def test_merkle_root_and_proofs(tree: dict[str, Any]) -> None:
    leaves = [bytes.fromhex(h) for h in tree["leaves"]]
    root = bytes.fromhex(tree["root"])
    assert merkle_root(leaves) == root
    for proof in tree["proofs"]:
        index = proof["index"]
        path = [bytes.fromhex(h) for h in proof["path"]]
        assert audit_path(leaves, index) == path
        assert verify_inclusion(leaves[index], index, len(leaves), path, root)
        if leaves and path:
            forged = bytes(32)
            assert not verify_inclusion(forged, index, len(leaves), path, root)
