"""Properties of the contract that no fixed vector can cover: round trips, tamper evidence,
and the strict parser's edge cases."""

from __future__ import annotations

import json
from functools import cache

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from meterproof.schemas.codec import MalformedPayload, decode_reading, encode_reading, sign_reading
from meterproof.schemas.jsonschema import MODELS, SCHEMA_DIR, render
from meterproof.schemas.reading import (
    I64_MAX,
    I64_MIN,
    OPTIONAL_FIELDS,
    U64_MAX,
    Alg,
    b64url_decode,
)
from meterproof.schemas.signatures import (
    EcdsaP256Private,
    InvalidKeyError,
    PrivateKey,
    generate_private_key,
    load_public_key,
)
from meterproof.schemas.signing import signing_bytes

u64 = st.integers(min_value=0, max_value=U64_MAX)
i64 = st.integers(min_value=I64_MIN, max_value=I64_MAX)
meter_ids = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-",
    min_size=1,
    max_size=64,
)
SIGNED_INTS = ("seq", "ts", "import_wh", "export_wh", *OPTIONAL_FIELDS)


@cache
def _key(alg: Alg) -> PrivateKey:
    return generate_private_key(alg, rsa_bits=2048)


@st.composite
def reading_fields(draw: st.DrawFn) -> dict[str, int | str]:
    fields: dict[str, int | str] = {
        "meter_id": draw(meter_ids),
        "seq": draw(u64),
        "ts": draw(u64),
        "import_wh": draw(u64),
        "export_wh": draw(u64),
    }
    for name in OPTIONAL_FIELDS:
        if draw(st.booleans()):
            fields[name] = draw(i64)
    return fields


@settings(max_examples=150, deadline=None)
@given(fields=reading_fields(), alg=st.sampled_from(list(Alg)))
def test_round_trip_and_verify(fields: dict[str, int | str], alg: Alg) -> None:
    key = _key(alg)
    reading = sign_reading(fields, key)
    decoded = decode_reading(encode_reading(reading))
    assert decoded == reading
    assert key.public_key().verify(b64url_decode(decoded.sig), signing_bytes(decoded))


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(fields=reading_fields(), alg=st.sampled_from([Alg.EDDSA, Alg.ES256]), data=st.data())
def test_any_single_bit_change_of_a_signed_field_fails(
    fields: dict[str, int | str], alg: Alg, data: st.DataObject
) -> None:
    key = _key(alg)
    reading = sign_reading(fields, key)
    name = data.draw(st.sampled_from([n for n in SIGNED_INTS if n in fields] + ["meter_id"]))
    if name == "meter_id":
        raw = bytearray(reading.meter_id.encode())
        pos = data.draw(st.integers(0, len(raw) * 8 - 1))
        raw[pos // 8] ^= 1 << (pos % 8)
        value: int | str = raw.decode("latin-1")
    else:
        width = 64
        bit = data.draw(st.integers(0, width - 1))
        original = int(fields[name])
        value = original ^ (1 << bit)
        if name in OPTIONAL_FIELDS:  # stay a signed 64-bit value
            value = (value + 2**63) % 2**64 - 2**63 if value > I64_MAX else value
    tampered_payload = json.dumps({**reading.wire_dict(), name: value}).encode()
    try:
        tampered = decode_reading(tampered_payload)
    except MalformedPayload:
        return  # the flip left the contract's alphabet: refused even earlier
    assert not key.public_key().verify(b64url_decode(tampered.sig), signing_bytes(tampered))


@settings(max_examples=100, deadline=None)
@given(fields=reading_fields(), data=st.data())
def test_adding_or_removing_an_optional_field_fails(
    fields: dict[str, int | str], data: st.DataObject
) -> None:
    key = _key(Alg.EDDSA)
    reading = sign_reading(fields, key)
    name = data.draw(st.sampled_from(OPTIONAL_FIELDS))
    wire = reading.wire_dict()
    if name in wire:
        del wire[name]
    else:
        wire[name] = 0
    tampered = decode_reading(json.dumps(wire).encode())
    assert not key.public_key().verify(b64url_decode(tampered.sig), signing_bytes(tampered))


def _valid_wire() -> dict[str, object]:
    fields = {"meter_id": "m-1", "seq": 7, "ts": 1, "import_wh": 2, "export_wh": 3}
    return sign_reading(fields, _key(Alg.EDDSA)).wire_dict()


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        (b"\xef\xbb\xbf{}", "not JSON"),
        (b'{"v":1} {}', "not JSON"),
        (b'{"v":1,"meter_id":"\xff"}', "not JSON"),
        (b"  ", "not JSON"),
        (b"null", "object"),
    ],
)
def test_parser_edge_cases(payload: bytes, detail: str) -> None:
    with pytest.raises(MalformedPayload, match=detail):
        decode_reading(payload)


def test_duplicate_key_and_boolean_version() -> None:
    body = json.dumps(_valid_wire())
    with pytest.raises(MalformedPayload, match="twice"):
        decode_reading((body[:-1] + ', "seq": 7}').encode())
    with pytest.raises(MalformedPayload, match="v"):
        decode_reading(body.replace('"v": 1', '"v": true').encode())


def test_duplicate_key_is_found_with_escapes_present() -> None:
    wire = _valid_wire()
    body = json.dumps({**wire, "kid": 'a"b'})[:-1] + ', "seq": 7}'
    with pytest.raises(MalformedPayload, match="twice"):
        decode_reading(body.encode())


def test_an_empty_kid_is_signed_and_decoded_as_given() -> None:
    """The contract lets `kid` be empty (it then names no key): the signer keeps it."""
    fields = {"meter_id": "m-1", "seq": 7, "ts": 1, "import_wh": 2, "export_wh": 3}
    reading = sign_reading(fields, _key(Alg.EDDSA), kid="")
    assert reading.kid == ""
    assert decode_reading(encode_reading(reading)) == reading


def test_explicit_null_is_malformed_and_absent_is_fine() -> None:
    wire = _valid_wire()
    decode_reading(json.dumps(wire).encode())
    with pytest.raises(MalformedPayload, match="null"):
        decode_reading(json.dumps({**wire, "power_w": None}).encode())


@pytest.mark.parametrize("field", ["power_w", "voltage_mv"])
def test_signed_optional_out_of_i64_is_malformed(field: str) -> None:
    wire = _valid_wire()
    decode_reading(json.dumps({**wire, field: I64_MIN}).encode())
    with pytest.raises(MalformedPayload):
        decode_reading(json.dumps({**wire, field: I64_MAX + 1}).encode())


def test_non_canonical_base64url_is_malformed() -> None:
    wire = _valid_wire()
    sig = str(wire["sig"])
    last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    # 64 bytes -> 86 chars: the last char carries 2 unused low bits
    noncanonical = sig[:-1] + last[last.index(sig[-1]) ^ 1]
    with pytest.raises(MalformedPayload, match="canonical"):
        decode_reading(json.dumps({**wire, "sig": noncanonical}).encode())


def test_key_is_bound_to_its_algorithm() -> None:
    ed_pem = _key(Alg.EDDSA).public_key().pem()
    load_public_key(Alg.EDDSA, ed_pem)
    for other in (Alg.ES256, Alg.RS256, Alg.PS256):
        with pytest.raises(InvalidKeyError):
            load_public_key(other, ed_pem)
    with pytest.raises(InvalidKeyError):
        load_public_key("none", ed_pem)
    with pytest.raises(InvalidKeyError):
        load_public_key("HS256", ed_pem)


@pytest.mark.parametrize("alg", [Alg.RS256, Alg.PS256])
def test_an_rsa_signature_is_exactly_the_modulus_long(alg: Alg) -> None:
    """A signature whose first byte is zero, sent without it, is refused: OpenSSL's PSS
    check alone accepts it, and a third party re-verifying the reading would not."""
    key = _key(alg)
    message, sig = next(
        (m, s) for m in (b"reading %d" % i for i in range(5_000)) if (s := key.sign(m))[0] == 0
    )
    public = key.public_key()
    assert len(sig) == 256
    assert public.verify(sig, message)
    assert not public.verify(sig[1:], message)
    assert not public.verify(b"\0" + sig, message)


def test_rsa_key_size_bounds() -> None:
    with pytest.raises(InvalidKeyError, match="2048 to 4096"):
        generate_private_key(Alg.RS256, rsa_bits=1024)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_checked_in_json_schema_matches_the_models(name: str) -> None:
    on_disk = (SCHEMA_DIR / name).read_text(encoding="utf-8")
    assert on_disk == render(MODELS[name]), "run `python -m schemas.jsonschema`"


def test_es256_signs_as_rfc_6979_says() -> None:
    """The nonce comes from the key and the message (RFC 6979 appendix A.2.5, P-256 with
    SHA-256, message "sample"): a device with a poor random source cannot give its key
    away by repeating one."""
    key = ec.derive_private_key(
        0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721, ec.SECP256R1()
    )
    r = "EFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716"
    s = "F7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8"
    assert EcdsaP256Private(key).sign(b"sample").hex().upper() == r + s
