"""Structured hostile payloads as hypothesis strategies, each with the outcome the spec
requires when that is knowable.

Every case starts from a correctly signed reading of a registered meter (all four
algorithms) and applies one corruption. RSA signing costs milliseconds, so RSA readings
come from a pool signed once per run; EdDSA and ES256 readings are signed per case.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from typing import Any, Final

from hypothesis import strategies as st

from meterproof.fuzz.checker import Case
from meterproof.fuzz.target import JUDGED, Fleet, Signer
from meterproof.schemas.codec import encode_reading, sign_reading
from meterproof.schemas.reading import (
    I64_MAX,
    I64_MIN,
    MAX_AGE_MS,
    MAX_FUTURE_MS,
    MAX_PAYLOAD_BYTES,
    OPTIONAL_FIELDS,
    U64_MAX,
    Alg,
    SignedReading,
    b64url,
    b64url_decode,
)

DAY_MS: Final = 24 * 3600 * 1000
FIELDS: Final = frozenset(
    {"v", "meter_id", "seq", "ts", "import_wh", "export_wh", "alg", "sig", "kid", *OPTIONAL_FIELDS}
)
U64_FIELDS: Final = ("seq", "ts", "import_wh", "export_wh")
METER_ID: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
_B64: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

#: Values an attacker tries first: SQL, paths, format strings, control and bidi characters,
#: lookalikes, very long strings.
HOSTILE: Final = (
    "'; DROP TABLE readings; --",
    "1' OR '1'='1",
    '" OR 1=1 --',
    "meter'); DELETE FROM meters; --",
    "../../../../etc/passwd",
    "..",
    ".",
    "../",
    "..\\..\\windows",
    "/etc/shadow",
    "meters/+/readings",
    "#",
    "$share/x/meters/+/readings",
    "%s%s%s%n",
    "{0.__class__}",
    "${jndi:ldap://127.0.0.1/a}",
    "a\x00b",
    "\x00",
    "line\nbreak",
    "cr\rlf\n",
    "tab\there",
    "\x1b[31mred\x1b[0m",
    "\u202eevil",
    "\ufeffbom",
    "\u0430\u0435",  # Cyrillic lookalikes
    "\U0001f600",
    "\udcff",
    "A" * 65,
    "A" * 4_000,
    "x" * 10_240,
    "",
    " ",
)


def _expect_valid(reading: SignedReading, now_ms: int) -> frozenset[str]:
    if reading.ts > now_ms + MAX_FUTURE_MS:
        return frozenset({"timestamp_skew"})
    if reading.ts < now_ms - MAX_AGE_MS:
        return frozenset({"stale_reading"})
    return JUDGED


def _topic(meter_id: str) -> str:
    return f"meters/{meter_id}/readings"


def _case(topic: str, payload: bytes, op: str, expect: frozenset[str] | None) -> Case:
    """Rule 1 comes first: anything over the size limit is malformed whatever else it is."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        expect = frozenset({"malformed"})
    return Case(topic, payload, f"hypothesis:{op}", expect)


def _dumps(obj: object) -> bytes:
    """The standard library, not orjson: it writes any int and lone surrogates as escapes."""
    return json.dumps(obj, separators=(",", ":")).encode()


def _splice(wire: dict[str, Any], key: str, raw: str) -> bytes:
    """`wire` as JSON with the value of `key` written as the raw token `raw`."""
    marker = "\x01fuzz-marker\x01"
    text = json.dumps({**wire, key: marker}, separators=(",", ":"))
    return text.replace(json.dumps(marker), raw).encode()


class Generators:
    def __init__(self, fleet: Fleet, *, seed: int, pool_size: int = 24) -> None:
        self.fleet = fleet
        rng = random.Random(seed)  # noqa: S311 - reproducible inputs, not secrets
        self.pool: dict[Signer, list[SignedReading]] = {
            s: [self._sign(s, self._random_fields(rng, s.meter_id)) for _ in range(pool_size)]
            for s in fleet.signers
            if s.slow
        }

    def _random_fields(self, rng: random.Random, meter_id: str) -> dict[str, int | str]:
        now = self.fleet.now_ms
        fields: dict[str, int | str] = {
            "meter_id": meter_id,
            "seq": rng.randrange(1_000_000),
            "ts": rng.randrange(now - 3_600_000, now + 200_000),
            "import_wh": rng.randrange(10**9),
            "export_wh": rng.randrange(10**9),
        }
        for name in OPTIONAL_FIELDS:
            if rng.random() < 0.5:
                fields[name] = rng.randrange(I64_MIN, I64_MAX)
        return fields

    @staticmethod
    def _sign(signer: Signer, fields: dict[str, Any], *, with_kid: bool = False) -> SignedReading:
        return sign_reading(fields, signer.key, kid=signer.kid if with_kid else None)

    def signed(
        self, draw: st.DrawFn, signers: list[Signer] | None = None
    ) -> tuple[Signer, SignedReading]:
        signer = draw(st.sampled_from(signers or self.fleet.signers))
        if signer.slow and signer in self.pool:
            reading = draw(st.sampled_from(self.pool[signer]))
            if draw(st.booleans()):  # kid is not signed: the pooled signature still holds
                reading = reading.model_copy(update={"kid": signer.kid})
            return signer, reading
        now = self.fleet.now_ms
        fields = draw(
            st.fixed_dictionaries(
                {
                    "meter_id": st.just(signer.meter_id),
                    "seq": st.one_of(st.integers(0, 1_000), st.integers(0, U64_MAX)),
                    "ts": st.one_of(
                        st.integers(now - 600_000, now + 200_000),
                        st.integers(now - 8 * DAY_MS, now + DAY_MS),
                        st.integers(0, U64_MAX),
                    ),
                    "import_wh": st.one_of(st.integers(0, 10**6), st.integers(0, U64_MAX)),
                    "export_wh": st.one_of(st.integers(0, 10**6), st.integers(0, U64_MAX)),
                },
                optional={name: st.integers(I64_MIN, I64_MAX) for name in OPTIONAL_FIELDS},
            )
        )
        return signer, self._sign(signer, fields, with_kid=draw(st.booleans()))

    def cases(self) -> st.SearchStrategy[Case]:
        @st.composite
        def one(draw: st.DrawFn) -> Case:
            return draw(st.sampled_from(OPS))(draw, self)

        return one()

    def seed_payloads(self, rng: random.Random, per_signer: int) -> list[tuple[str, bytes]]:
        """Valid payloads of every signer, for the byte-level mutators to start from."""
        out = []
        for signer in self.fleet.signers:
            for i in range(per_signer):
                if signer.slow:
                    reading = self.pool[signer][i % len(self.pool[signer])]
                else:
                    reading = self._sign(signer, self._random_fields(rng, signer.meter_id))
                out.append((_topic(signer.meter_id), encode_reading(reading)))
        return out


Op = Callable[[st.DrawFn, Generators], Case]


def op_valid(draw: st.DrawFn, g: Generators) -> Case:
    _, r = g.signed(draw)
    return _case(_topic(r.meter_id), encode_reading(r), "valid", _expect_valid(r, g.fleet.now_ms))


def op_reformat(draw: st.DrawFn, g: Generators) -> Case:
    """Same values, other spelling: key order, whitespace, \\u escapes. Still the reading."""
    _, r = g.signed(draw)
    items = draw(st.permutations(list(r.wire_dict().items())))
    comma, colon = draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,\n\t", " : ")]))

    def escaped(s: str) -> str:
        if draw(st.booleans()):
            return '"' + "".join(f"\\u{ord(c):04x}" for c in s) + '"'
        return json.dumps(s)

    body = comma.join(
        f"{escaped(k)}{colon}{escaped(v) if isinstance(v, str) else v}" for k, v in items
    )
    lead, trail = (
        draw(st.sampled_from(["", " ", "\n", "\t\r\n "])),
        draw(st.sampled_from(["", " ", "\r\n"])),
    )
    payload = f"{lead}{{{body}}}{trail}".encode()
    return _case(_topic(r.meter_id), payload, "reformat", _expect_valid(r, g.fleet.now_ms))


def op_wrong_type(draw: st.DrawFn, g: Generators) -> Case:
    _, r = g.signed(draw)
    wire = r.wire_dict()
    key = draw(st.sampled_from(sorted(wire)))
    junk = st.one_of(st.none(), st.lists(st.integers(), max_size=3),
                     st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))  # fmt: skip
    value: object
    if isinstance(wire[key], str):
        value = draw(st.one_of(junk, st.integers(), st.booleans(), st.floats()))
    else:
        value = draw(st.one_of(junk, st.booleans(), st.text(max_size=20),
                               st.floats(allow_nan=False, allow_infinity=False)))  # fmt: skip
    return _case(
        _topic(r.meter_id), _dumps({**wire, key: value}), "wrong_type", frozenset({"malformed"})
    )


def op_missing_key(draw: st.DrawFn, g: Generators) -> Case:
    _, r = g.signed(draw)
    wire = r.wire_dict()
    key = draw(
        st.sampled_from(["v", "meter_id", "seq", "ts", "import_wh", "export_wh", "alg", "sig"])
    )
    del wire[key]
    return _case(_topic(r.meter_id), _dumps(wire), "missing_key", frozenset({"malformed"}))


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def op_extra_key(draw: st.DrawFn, g: Generators) -> Case:
    _, r = g.signed(draw)
    key = draw(
        st.one_of(st.text(max_size=30), st.sampled_from(HOSTILE)).filter(lambda k: k not in FIELDS)
    )
    wire = {**r.wire_dict(), key: draw(_JSON_VALUES)}
    return _case(_topic(r.meter_id), _dumps(wire), "extra_key", frozenset({"malformed"}))


def op_duplicate_key(draw: st.DrawFn, g: Generators) -> Case:
    """A key given twice, once possibly as \\u escapes (the same key to every parser)."""
    _, r = g.signed(draw)
    wire = r.wire_dict()
    key = draw(st.sampled_from(sorted(wire)))
    spelled = "".join(f"\\u{ord(c):04x}" for c in key) if draw(st.booleans()) else key
    value = wire[key] if draw(st.booleans()) else draw(_JSON_VALUES)
    extra = f'"{spelled}":{json.dumps(value)}'
    body = _dumps(wire).decode()
    payload = (
        f"{{{extra},{body[1:]}" if draw(st.booleans()) else f"{body[:-1]},{extra}}}"
    ).encode()
    return _case(_topic(r.meter_id), payload, "duplicate_key", frozenset({"malformed"}))


def op_out_of_range(draw: st.DrawFn, g: Generators) -> Case:
    _, r = g.signed(draw)
    wire = r.wire_dict()
    key = draw(st.sampled_from(sorted(k for k, v in wire.items() if isinstance(v, int))))
    if key == "v":
        value = draw(st.integers().filter(lambda n: n != 1))
    elif key in U64_FIELDS:
        value = draw(st.one_of(st.integers(max_value=-1), st.integers(min_value=U64_MAX + 1)))
    else:
        value = draw(
            st.one_of(st.integers(max_value=I64_MIN - 1), st.integers(min_value=I64_MAX + 1))
        )
    return _case(
        _topic(r.meter_id), _dumps({**wire, key: value}), "out_of_range", frozenset({"malformed"})
    )


def op_number_syntax(draw: st.DrawFn, g: Generators) -> Case:
    """Integers written with a fraction, an exponent, a plus, leading zeros, or as words."""
    _, r = g.signed(draw)
    wire = r.wire_dict()
    key = draw(st.sampled_from(sorted(k for k, v in wire.items() if isinstance(v, int))))
    n = wire[key]
    raw = draw(st.sampled_from([f"{n}.0", f"{n}e0", f"{n}E+0", f"{n}.5", f"+{n}", f"0{n}",
                                "1e400", "-1e-400", "NaN", "Infinity", "-Infinity", "0x10",
                                "true", "null", f'"{n}"', f"{n}n"]))  # fmt: skip
    return _case(
        _topic(r.meter_id), _splice(wire, key, raw), "number_syntax", frozenset({"malformed"})
    )


def op_hostile_string(draw: st.DrawFn, g: Generators) -> Case:
    """Hostile text in meter_id (payload and topic), alg or kid."""
    signer, r = g.signed(draw)
    wire = r.wire_dict()
    key = draw(st.sampled_from(["meter_id", "alg", "kid"]))
    value = draw(st.one_of(st.sampled_from(HOSTILE), st.text(max_size=80)))
    topic = _topic(r.meter_id)
    expect: frozenset[str] | None
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        expect = frozenset({"malformed"})  # JSON may escape a lone surrogate; orjson refuses it
    elif key == "meter_id":
        if draw(st.booleans()):
            topic = _topic(value)
        expect = None if METER_ID.fullmatch(value) else frozenset({"malformed"})
    elif key == "alg":
        # A real algorithm name: the key decides. Any other, of any length, names no key.
        expect = None if value in {a.value for a in Alg} else frozenset({"unsupported_alg"})
    elif len(value) > 64:
        expect = frozenset({"malformed"})
    else:
        registered = {k.kid for k in g.fleet.meters[signer.meter_id].keys}
        expect = None if value in registered else frozenset({"unsupported_alg"})
    return _case(topic, _dumps({**wire, key: value}), "hostile_string", expect)


def op_long_string(draw: st.DrawFn, g: Generators) -> Case:
    _, r = g.signed(draw)
    wire = r.wire_dict()
    key = draw(st.sampled_from(["sig", "kid", "alg", "meter_id"]))
    n = draw(st.integers(65, 5_000))
    expect = frozenset({"malformed"})
    if key == "sig":
        value = b64url(draw(st.binary(min_size=1, max_size=n)))
        wire.pop("kid", None)
        expect = frozenset({"bad_signature"})
    else:
        value = draw(st.sampled_from(["A", "é", "\x00", "9"])) * n
        if key == "alg":
            expect = frozenset({"unsupported_alg"})  # no length limit: it names no key
    return _case(_topic(r.meter_id), _dumps({**wire, key: value}), "long_string", expect)


def op_nested(draw: st.DrawFn, g: Generators) -> Case:
    _, r = g.signed(draw)
    wire = r.wire_dict()
    depth = draw(st.integers(1, 5_000))
    open_, close = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    nest = open_ * depth + "1" + close * depth
    if draw(st.booleans()):
        payload = _splice(wire, draw(st.sampled_from(sorted(wire))), nest)
    else:
        payload = (open_ * depth + _dumps(wire).decode() + close * depth).encode()
    return _case(_topic(r.meter_id), payload, "nested", frozenset({"malformed"}))


def op_size_limit(draw: st.DrawFn, g: Generators) -> Case:
    """Trailing whitespace up to the limit is still the reading; one byte more is not."""
    _, r = g.signed(draw)
    body = encode_reading(r)
    size = draw(
        st.sampled_from([MAX_PAYLOAD_BYTES, MAX_PAYLOAD_BYTES + 1]) | st.integers(len(body), 12_000)
    )
    payload = body + b" " * (size - len(body))
    expect = _expect_valid(r, g.fleet.now_ms)
    return _case(_topic(r.meter_id), payload, "size_limit", expect)


def op_alg_confusion(draw: st.DrawFn, g: Generators) -> Case:
    signer, r = g.signed(draw)
    others = [a.value for a in Alg if a is not signer.alg]
    alg = draw(
        st.sampled_from(
            [*others, "none", "None", "HS256", "eddsa", "ES256K", "RS512", " EdDSA", ""]
        )
    )
    registered = {a.value for a in g.fleet.algs_of(signer.meter_id)}
    unsupported = r.kid is not None or alg not in registered
    expect = frozenset({"unsupported_alg" if unsupported else "bad_signature"})
    payload = _dumps({**r.wire_dict(), "alg": alg})
    return _case(_topic(r.meter_id), payload, "alg_confusion", expect)


def op_sig_tamper(draw: st.DrawFn, g: Generators) -> Case:
    """A bit flipped, perhaps cut short, down to the empty `sig` (no bytes: it fails too)."""
    _, r = g.signed(draw)
    raw = bytearray(b64url_decode(r.sig))
    bit = draw(st.integers(0, len(raw) * 8 - 1))
    raw[bit // 8] ^= 1 << (bit % 8)
    if draw(st.booleans()):
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    payload = _dumps({**r.wire_dict(), "sig": b64url(bytes(raw))})
    return _case(_topic(r.meter_id), payload, "sig_tamper", frozenset({"bad_signature"}))


def op_field_tamper(draw: st.DrawFn, g: Generators) -> Case:
    """Any change to a signed value after signing, including adding or dropping an optional."""
    _, r = g.signed(draw)
    wire = r.wire_dict()
    signed = [k for k in wire if k in U64_FIELDS or k in OPTIONAL_FIELDS]
    key = draw(st.sampled_from([*signed, *OPTIONAL_FIELDS]))
    if key in wire and key in OPTIONAL_FIELDS and draw(st.booleans()):
        del wire[key]
    else:
        low, high = (0, U64_MAX) if key in U64_FIELDS else (I64_MIN, I64_MAX)
        wire[key] = draw(st.integers(low, high).filter(lambda n: n != wire.get(key)))
    return _case(_topic(r.meter_id), _dumps(wire), "field_tamper", frozenset({"bad_signature"}))


def op_kid(draw: st.DrawFn, g: Generators) -> Case:
    signer, r = g.signed(draw)
    meter = g.fleet.meters[signer.meter_id]
    same_alg = [k.kid for k in meter.keys if k.key.alg is signer.alg and k.kid != signer.kid]
    if bool(same_alg) and draw(st.booleans()):
        kid, expect = draw(st.sampled_from(same_alg)), "bad_signature"
    else:
        kid = draw(st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True).filter(
            lambda k: k not in {x.kid for x in meter.keys}))  # fmt: skip
        expect = "unsupported_alg"
    payload = _dumps({**r.wire_dict(), "kid": kid})
    return _case(_topic(r.meter_id), payload, "kid", frozenset({expect}))


def op_topic(draw: st.DrawFn, g: Generators) -> Case:
    _, r = g.signed(draw)
    topic = draw(st.one_of(
        st.sampled_from([_topic(m) for m in g.fleet.meters if m != r.meter_id]),
        st.sampled_from([f"meters/{r.meter_id}/receipts", f"meters/{r.meter_id}",
                         "meters//readings",
                         f"verified/{r.meter_id}/readings", f"meters/{r.meter_id}/readings/x",
                         f"Meters/{r.meter_id}/readings", ""]),
        st.text(max_size=100).map(_topic),
    ).filter(lambda t: t != _topic(r.meter_id)))  # fmt: skip
    return _case(topic, encode_reading(r), "topic", frozenset({"topic_mismatch"}))


def op_registry(draw: st.DrawFn, g: Generators) -> Case:
    """Good signatures from meters the registry refuses: unknown, not active, expired key."""
    fleet = g.fleet
    choice = draw(st.sampled_from(["unknown", "inactive", "expired"]))
    signer = fleet.unregistered if choice != "inactive" else draw(st.sampled_from(fleet.inactive))
    meter_id = signer.meter_id
    if choice == "unknown":
        meter_id = draw(st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True).filter(
            lambda m: m not in fleet.meters))  # fmt: skip
    elif choice == "expired":
        meter_id = "fz-expired"
    fields = {"meter_id": meter_id, "seq": draw(st.integers(0, U64_MAX)),
              "ts": fleet.now_ms, "import_wh": 1, "export_wh": 1}  # fmt: skip
    reading = sign_reading(fields, signer.key)
    reason = {
        "unknown": "unknown_meter",
        "inactive": "meter_not_active",
        "expired": "unsupported_alg",
    }
    return _case(_topic(meter_id), encode_reading(reading), "registry", frozenset({reason[choice]}))


def op_encoding(draw: st.DrawFn, g: Generators) -> Case:
    """Byte-order marks, invalid UTF-8, raw control characters, trailing content, UTF-16."""
    _, r = g.signed(draw)
    body = encode_reading(r)
    at = body.index(b'"meter_id":"') + len(b'"meter_id":"')
    variant = draw(st.sampled_from(["bom", "invalid_utf8", "control", "trailing", "utf16", "nul"]))
    if variant == "bom":
        payload = b"\xef\xbb\xbf" + body
    elif variant == "invalid_utf8":
        bad = draw(
            st.sampled_from(
                [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"]
            )
        )
        payload = body[:at] + bad + body[at:]
    elif variant == "control":
        payload = body[:at] + bytes([draw(st.integers(0, 0x1F))]) + body[at:]
    elif variant == "trailing":
        payload = body + draw(st.sampled_from([b"x", b"{}", b"\x00", b"// c", b",", b"]"]))
    elif variant == "utf16":
        payload = body.decode().encode("utf-16")
    else:
        payload = body + b"\x00" * draw(st.integers(1, 8))
    return _case(_topic(r.meter_id), payload, f"encoding_{variant}", frozenset({"malformed"}))


def op_sig_encoding(draw: st.DrawFn, g: Generators) -> Case:
    _, r = g.signed(draw)
    sig = r.sig
    variant = draw(st.sampled_from(["padded", "standard_alphabet", "non_canonical", "space"]))
    if variant == "padded":
        sig += "=" * draw(st.integers(1, 2))
    elif variant == "standard_alphabet" and ("-" in sig or "_" in sig):
        sig = sig.replace("-", "+").replace("_", "/")
    elif variant == "space":
        sig = sig[:10] + " " + sig[10:]
    else:
        last = _B64.index(sig[-1])
        sig = sig[:-1] + _B64[last | 1]  # unused low bits set: decodes, but not canonical
        variant = "non_canonical"
    payload = _dumps({**r.wire_dict(), "sig": sig})
    return _case(_topic(r.meter_id), payload, f"sig_{variant}", frozenset({"malformed"}))


OPS: Final[tuple[Op, ...]] = (
    op_valid, op_valid, op_reformat, op_wrong_type, op_missing_key, op_extra_key,
    op_duplicate_key, op_out_of_range, op_number_syntax, op_hostile_string, op_long_string,
    op_nested, op_size_limit, op_alg_confusion, op_sig_tamper, op_field_tamper, op_kid,
    op_topic, op_registry, op_encoding, op_sig_encoding,
)  # fmt: skip
