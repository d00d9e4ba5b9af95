"""Bytes on the wire <-> `SignedReading`, with every malformed case named.

orjson does the parsing (about five times faster than `json` here) and already refuses a
byte-order mark, invalid UTF-8, lone surrogates, NaN and trailing content; integers beyond
64 bits come back as floats, which the strict model refuses. The one rule orjson does not
enforce is "no key twice", checked after validation where the object is known to be flat.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from pydantic import ValidationError

from meterproof.schemas.reading import MAX_PAYLOAD_BYTES, SignedReading, b64url
from meterproof.schemas.signatures import PrivateKey
from meterproof.schemas.signing import signing_bytes


class MalformedPayload(ValueError):  # noqa: N818 - named for the spec's reason code
    """The payload is not a signed reading (docs/spec/reading-v1.md sections 4-5); `str()`
    is the detail."""


def decode_reading(payload: bytes) -> SignedReading:
    """Parse and validate one payload, or raise `MalformedPayload` saying why."""
    obj = load_object(payload)
    try:
        reading = SignedReading.model_validate(obj)
    except ValidationError as exc:
        raise MalformedPayload(first_error(exc)) from None
    if _has_duplicate_key(payload, obj, reading):
        raise MalformedPayload("a key is given twice")
    return reading


def encode_reading(reading: SignedReading) -> bytes:
    """Compact JSON, absent optionals omitted: the form meters publish."""
    return orjson.dumps(reading.wire_dict())


def sign_reading(
    fields: dict[str, Any], key: PrivateKey, *, kid: str | None = None
) -> SignedReading:
    """Build a signed reading from its signed fields (meter_id, seq, ts, registers, ...)."""
    named: dict[str, str] = {} if kid is None else {"kid": kid}  # even "": it is sent as given
    unsigned = SignedReading.model_validate(
        {"v": 1, **fields, "alg": key.alg.value, "sig": "AA", **named}
    )
    sig = b64url(key.sign(signing_bytes(unsigned)))
    return unsigned.model_copy(update={"sig": sig})


def load_object(payload: bytes) -> dict[str, Any]:
    """The checks before a model sees a payload: the size limit, JSON, an object."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise MalformedPayload(f"payload is {len(payload)} bytes, limit {MAX_PAYLOAD_BYTES}")
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise MalformedPayload(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise MalformedPayload(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def keys_repeat(payload: bytes) -> bool:
    """Whether any JSON object in `payload` gives a key twice (orjson keeps the last one
    silently; two parsers must not disagree about what was signed)."""
    keys_seen: list[str] = []
    json.loads(payload, object_pairs_hook=lambda pairs: keys_seen.extend(k for k, _ in pairs))
    return len(keys_seen) != len(set(keys_seen))


def _has_duplicate_key(payload: bytes, obj: dict[str, Any], reading: SignedReading) -> bool:
    """In a validated reading every value is an int or a string (`meter_id`, `alg`, `sig`
    and, if present, `kid`), so without escapes each key and string value accounts for
    exactly two quote characters."""
    if b"\\" not in payload:
        strings = 3 + (reading.kid is not None)
        return payload.count(b'"') != 2 * (len(obj) + strings)
    return keys_repeat(payload)


def first_error(exc: ValidationError) -> str:
    """The location may be an unknown key the client chose: escaped when it holds anything
    unprintable (PostgreSQL `text` cannot store NUL, and a log line must stay one line), and
    shortened, because the detail is stored and logged for every rejection."""
    err = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p) for p in err["loc"]) or "payload"
    if not where.isprintable():
        where = ascii(where)
    if len(where) > 80:
        where = where[:77] + "..."
    return f"{where}: {err['msg']}"
