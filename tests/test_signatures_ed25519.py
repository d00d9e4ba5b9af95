"""The Ed25519 check (solders: ed25519-dalek's strict verification) gives libsodium's verdict.

Readings were checked by libsodium until the check moved to ed25519-dalek for its cost
(docs/scaling.md). Two Ed25519 verifiers can disagree on crafted signatures: small-order
or mixed-order keys and R, S not below the group order L, the cofactored or cofactorless
equation. A meter's reading must not pass one and fail the other, so each case below is
built (never taken on trust from a list) and judged by both: our `Ed25519Public.verify`
and libsodium's `crypto_sign_open` through PyNaCl.

The torsion points are found, not written down: L times a point of the curve lies in the
torsion subgroup, and a point of order 8 among those generates it. The arithmetic for
that is the textbook affine twisted Edwards addition, here only because libsodium's API
refuses small-order points as inputs.
"""

from __future__ import annotations

import hashlib
from functools import cache

import nacl.bindings as sodium
import nacl.exceptions
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterproof.schemas.signatures import Ed25519Public, InvalidKeyError

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, P - 2, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)
Point = tuple[int, int]
IDENTITY: Point = (0, 1)


def _add(a: Point, b: Point) -> Point:
    (x1, y1), (x2, y2) = a, b
    t = D * x1 * x2 * y1 * y2 % P
    x3 = (x1 * y2 + y1 * x2) * pow(1 + t, P - 2, P) % P
    y3 = (y1 * y2 + x1 * x2) * pow(1 - t, P - 2, P) % P
    return x3, y3


def _times(n: int, point: Point) -> Point:
    result = IDENTITY
    while n:
        if n & 1:
            result = _add(result, point)
        point = _add(point, point)
        n >>= 1
    return result


def _decode(encoded: bytes) -> Point | None:
    """RFC 8032 section 5.1.3, except that y is not required to be below P (so that
    non-canonical encodings can be built from it)."""
    y = int.from_bytes(encoded, "little") & ((1 << 255) - 1)
    u = (y * y - 1) * pow(D * y * y + 1, P - 2, P) % P
    x = pow(u, (P + 3) // 8, P)
    if x * x % P != u:
        x = x * SQRT_M1 % P
    if x * x % P != u:
        return None
    if x == 0 and encoded[31] >> 7:
        return None
    if x & 1 != encoded[31] >> 7:
        x = P - x
    return x, y % P


def _point(encoded: bytes) -> Point:
    point = _decode(encoded)
    assert point is not None, encoded.hex()
    return point


def _encode(point: Point) -> bytes:
    x, y = point
    return (y | (x & 1) << 255).to_bytes(32, "little")


@cache
def _order_8() -> Point:
    """A point of order 8: L times a curve point is a torsion point; the first one whose
    fourfold is not the identity has order 8."""
    for y in range(2, 1_000):
        point = _decode(y.to_bytes(32, "little"))
        if point is None:
            continue
        torsion = _times(L, point)
        if _times(4, torsion) != IDENTITY:
            return torsion
    raise AssertionError("no point of order 8 found")


def _torsion(j: int) -> Point:
    return _times(j % 8, _order_8())


def _scalar(seed: bytes) -> bytes:
    return sodium.crypto_core_ed25519_scalar_reduce(hashlib.sha512(seed).digest())


def _sign(a: bytes, r: bytes, message: bytes, *, key: bytes, nonce_point: bytes) -> bytes:
    """S = r + H(R || A || M) a, for the given encodings of A and R (which need not be aB
    and rB: that is how mixed-order keys and R are made)."""
    k = sodium.crypto_core_ed25519_scalar_reduce(
        hashlib.sha512(nonce_point + key + message).digest()
    )
    s = sodium.crypto_core_ed25519_scalar_add(r, sodium.crypto_core_ed25519_scalar_mul(k, a))
    return nonce_point + s


def _base(scalar: bytes) -> bytes:
    return sodium.crypto_scalarmult_ed25519_base_noclamp(scalar)


def _honest(seed: bytes, message: bytes) -> tuple[bytes, bytes]:
    """A key aB and its RFC 8032-shaped signature of `message` (scalars from `seed`)."""
    a, r = _scalar(b"a" + seed), _scalar(b"r" + seed)
    key = _base(a)
    return key, _sign(a, r, message, key=key, nonce_point=_base(r))


def _verdicts(key: bytes, signature: bytes, message: bytes) -> tuple[bool, bool]:
    """(ours, libsodium's)."""
    try:
        sodium.crypto_sign_open(signature + message, key)
        libsodium = True
    except nacl.exceptions.BadSignatureError:
        libsodium = False
    return Ed25519Public(key).verify(signature, message), libsodium


seeds = st.binary(min_size=1, max_size=16)
messages = st.binary(max_size=300)


@settings(max_examples=150, deadline=None)
@given(seed=seeds, message=messages)
def test_an_honest_signature_passes_both(seed: bytes, message: bytes) -> None:
    key, signature = _honest(seed, message)
    assert _verdicts(key, signature, message) == (True, True)


@settings(max_examples=150, deadline=None)
@given(seed=seeds, message=messages, j=st.integers(1, 7))
def test_a_mixed_order_key_gets_libsodiums_verdict(seed: bytes, message: bytes, j: int) -> None:
    """A = aB + T: the cofactorless equation holds only when H(R || A || M) kills T."""
    a, r = _scalar(b"a" + seed), _scalar(b"r" + seed)
    key = _encode(_add(_point(_base(a)), _torsion(j)))
    signature = _sign(a, r, message, key=key, nonce_point=_base(r))
    ours, libsodium = _verdicts(key, signature, message)
    assert ours == libsodium


def test_mixed_order_keys_are_accepted_only_sometimes_by_both() -> None:
    """The property above is not vacuous: among 64 such signatures both verifiers accept
    some (those whose k is a multiple of T's order) and refuse the rest."""
    outcomes = []
    for i in range(64):
        a, r = _scalar(b"a%d" % i), _scalar(b"r%d" % i)
        key = _encode(_add(_point(_base(a)), _torsion(4)))
        signature = _sign(a, r, b"m", key=key, nonce_point=_base(r))
        ours, libsodium = _verdicts(key, signature, b"m")
        assert ours == libsodium
        outcomes.append(ours)
    assert any(outcomes)
    assert not all(outcomes)


@settings(max_examples=100, deadline=None)
@given(seed=seeds, message=messages, j=st.integers(1, 7))
def test_a_mixed_order_r_is_refused_by_both(seed: bytes, message: bytes, j: int) -> None:
    """R = rB + T passes only the cofactored equation, which neither verifier uses."""
    a, r = _scalar(b"a" + seed), _scalar(b"r" + seed)
    key = _base(a)
    nonce_point = _encode(_add(_point(_base(r)), _torsion(j)))
    signature = _sign(a, r, message, key=key, nonce_point=nonce_point)
    assert _verdicts(key, signature, message) == (False, False)


@pytest.mark.parametrize("j", range(8))
@pytest.mark.parametrize("nonce_j", range(8))
def test_a_small_order_key_is_refused_by_both(j: int, nonce_j: int) -> None:
    """A and R of small order with S = 0: the equation R = -kA holds whenever kA = -R,
    which lax verifiers then accept for any message; both refuse small-order keys."""
    key = _encode(_torsion(j))
    signature = _encode(_torsion(nonce_j)) + bytes(32)
    for message in (b"", b"m", b"any reading"):
        assert _verdicts(key, signature, message) == (False, False)


@settings(max_examples=100, deadline=None)
@given(seed=seeds, message=messages)
def test_s_not_below_the_group_order_is_refused_by_both(seed: bytes, message: bytes) -> None:
    key, signature = _honest(seed, message)
    s = int.from_bytes(signature[32:], "little") + L  # below 2**254: S < L < 2**253
    mauled = signature[:32] + s.to_bytes(32, "little")
    assert _verdicts(key, mauled, message) == (False, False)


def test_non_canonical_encodings_of_small_order_keys_are_refused_by_both() -> None:
    """y + P for y = 0 (the points of order 4) and y = 1 (the identity), each with both
    sign bits: the small-order points whose y has a second encoding below 2**255."""
    for y in (0, 1):
        for sign in (0, 1 << 255):
            key = ((y + P) | sign).to_bytes(32, "little")
            signature = _encode(IDENTITY) + bytes(32)
            assert _verdicts(key, signature, b"m") == (False, False)


@settings(max_examples=150, deadline=None)
@given(seed=seeds, message=messages, flip=st.integers(0, 64 * 8 - 1))
def test_a_flipped_bit_of_the_signature_is_refused_by_both(
    seed: bytes, message: bytes, flip: int
) -> None:
    key, honest = _honest(seed, message)
    signature = bytearray(honest)
    signature[flip // 8] ^= 1 << (flip % 8)
    assert _verdicts(key, bytes(signature), message) == (False, False)


def test_a_key_of_the_wrong_length_is_refused_when_loaded() -> None:
    with pytest.raises(InvalidKeyError):
        Ed25519Public(bytes(31))
    assert not Ed25519Public(_base(_scalar(b"a"))).verify(bytes(63), b"m")
