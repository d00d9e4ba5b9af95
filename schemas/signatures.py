"""Sign and verify for the four algorithms of docs/spec/reading-v1.md section 7.

A key is always loaded *for* an algorithm and refuses any other key type, so a reading can
never choose how it is checked (no `none`, no HMAC, no ES256 against an Ed25519 key).
Ed25519 signs through PyNaCl (libsodium) and verifies through solders (ed25519-dalek's
strict check, as Solana runs it): the check is the largest single cost of a reading, and
dalek's is about a quarter cheaper than libsodium's here and twice as cheap as
`cryptography`'s (docs/scaling.md, "Ed25519 checked by ed25519-dalek"). Both refuse what
the spec refuses (section 7): S not below L and small-order keys or R, with the
cofactorless equation; `tests/test_signatures_ed25519.py` holds the check to libsodium's
verdicts, edge cases included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Protocol

import nacl.signing
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from solders.pubkey import Pubkey
from solders.signature import Signature

from meterproof.schemas.reading import Alg

RSA_MIN_BITS: Final = 2048
RSA_MAX_BITS: Final = 4096
_P256_BYTES: Final = 32
_PSS: Final = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


class InvalidKeyError(ValueError):
    """A key that does not fit its algorithm, or cannot be parsed."""


class PublicKey(Protocol):
    @property
    def alg(self) -> Alg: ...

    def verify(self, signature: bytes, message: bytes) -> bool: ...

    def pem(self) -> str: ...


class PrivateKey(Protocol):
    @property
    def alg(self) -> Alg: ...

    def sign(self, message: bytes) -> bytes: ...

    def public_key(self) -> PublicKey: ...

    def pem(self) -> bytes: ...


def _spki_pem(key: ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def _pkcs8_pem(
    key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True, slots=True)
class Ed25519Public:
    raw: bytes
    alg: Alg = Alg.EDDSA
    _dalek: Pubkey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.raw) != 32:
            raise InvalidKeyError(f"an Ed25519 public key is 32 bytes, not {len(self.raw)}")
        object.__setattr__(self, "_dalek", Pubkey(self.raw))

    def verify(self, signature: bytes, message: bytes) -> bool:
        if len(signature) != 64:
            return False
        return bool(Signature(signature).verify(self._dalek, message))

    def pem(self) -> str:
        return _spki_pem(ed25519.Ed25519PublicKey.from_public_bytes(self.raw))


@dataclass(frozen=True, slots=True)
class EcdsaP256Public:
    key: ec.EllipticCurvePublicKey
    alg: Alg = Alg.ES256

    def verify(self, signature: bytes, message: bytes) -> bool:
        if len(signature) != 2 * _P256_BYTES:
            return False
        r = int.from_bytes(signature[:_P256_BYTES], "big")
        s = int.from_bytes(signature[_P256_BYTES:], "big")
        try:
            self.key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True

    def pem(self) -> str:
        return _spki_pem(self.key)


@dataclass(frozen=True, slots=True)
class RsaPublic:
    key: rsa.RSAPublicKey
    alg: Alg

    def verify(self, signature: bytes, message: bytes) -> bool:
        # The spec fixes `sig` at the modulus length; OpenSSL's PSS check also takes a
        # signature without its leading zero bytes, which a strict verifier refuses.
        if len(signature) != (self.key.key_size + 7) // 8:
            return False
        pad = _PSS if self.alg is Alg.PS256 else padding.PKCS1v15()
        try:
            self.key.verify(signature, message, pad, hashes.SHA256())
        except InvalidSignature:
            return False
        return True

    def pem(self) -> str:
        return _spki_pem(self.key)


@dataclass(frozen=True, slots=True)
class Ed25519Private:
    key: ed25519.Ed25519PrivateKey
    alg: Alg = Alg.EDDSA
    _nacl: nacl.signing.SigningKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        seed = self.key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        object.__setattr__(self, "_nacl", nacl.signing.SigningKey(seed))

    def sign(self, message: bytes) -> bytes:
        return self._nacl.sign(message).signature

    def public_key(self) -> PublicKey:
        return Ed25519Public(self.key.public_key().public_bytes_raw())

    def pem(self) -> bytes:
        return _pkcs8_pem(self.key)


@dataclass(frozen=True, slots=True)
class EcdsaP256Private:
    key: ec.EllipticCurvePrivateKey
    alg: Alg = Alg.ES256

    def sign(self, message: bytes) -> bytes:
        """RFC 6979: the nonce derived from the key and the message, never from a random
        source a device may lack (a repeated nonce gives the key away); one reading, one
        signature."""
        signing = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
        r, s = decode_dss_signature(self.key.sign(message, signing))
        return r.to_bytes(_P256_BYTES, "big") + s.to_bytes(_P256_BYTES, "big")

    def public_key(self) -> PublicKey:
        return EcdsaP256Public(self.key.public_key())

    def pem(self) -> bytes:
        return _pkcs8_pem(self.key)


@dataclass(frozen=True, slots=True)
class RsaPrivate:
    key: rsa.RSAPrivateKey
    alg: Alg

    def sign(self, message: bytes) -> bytes:
        pad = _PSS if self.alg is Alg.PS256 else padding.PKCS1v15()
        return self.key.sign(message, pad, hashes.SHA256())

    def public_key(self) -> PublicKey:
        return RsaPublic(self.key.public_key(), self.alg)

    def pem(self) -> bytes:
        return _pkcs8_pem(self.key)


def _check_rsa_size(bits: int) -> None:
    if not RSA_MIN_BITS <= bits <= RSA_MAX_BITS:
        raise InvalidKeyError(f"RSA keys must be {RSA_MIN_BITS} to {RSA_MAX_BITS} bits, not {bits}")


def load_public_key(alg: Alg | str, pem: str | bytes) -> PublicKey:
    """Parse a SubjectPublicKeyInfo PEM and bind it to `alg`; a mismatch is an error."""
    alg = _alg(alg)
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise InvalidKeyError(f"not a PEM public key: {exc}") from exc
    if alg is Alg.EDDSA and isinstance(key, ed25519.Ed25519PublicKey):
        return Ed25519Public(key.public_bytes_raw())
    if alg is Alg.ES256 and isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise InvalidKeyError(f"ES256 needs a P-256 key, not {key.curve.name}")
        return EcdsaP256Public(key)
    if alg in (Alg.RS256, Alg.PS256) and isinstance(key, rsa.RSAPublicKey):
        _check_rsa_size(key.key_size)
        return RsaPublic(key, alg)
    raise InvalidKeyError(f"a {type(key).__name__} cannot be used for {alg}")


def load_private_key(alg: Alg | str, pem: bytes) -> PrivateKey:
    """Parse an unencrypted PKCS#8 PEM private key and bind it to `alg`."""
    alg = _alg(alg)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidKeyError("not an unencrypted PEM private key") from exc
    if alg is Alg.EDDSA and isinstance(key, ed25519.Ed25519PrivateKey):
        return Ed25519Private(key)
    if alg is Alg.ES256 and isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise InvalidKeyError(f"ES256 needs a P-256 key, not {key.curve.name}")
        return EcdsaP256Private(key)
    if alg in (Alg.RS256, Alg.PS256) and isinstance(key, rsa.RSAPrivateKey):
        _check_rsa_size(key.key_size)
        return RsaPrivate(key, alg)
    raise InvalidKeyError(f"a {type(key).__name__} cannot be used for {alg}")


def generate_private_key(alg: Alg | str, *, rsa_bits: int = RSA_MAX_BITS) -> PrivateKey:
    alg = _alg(alg)
    if alg is Alg.EDDSA:
        return Ed25519Private(ed25519.Ed25519PrivateKey.generate())
    if alg is Alg.ES256:
        return EcdsaP256Private(ec.generate_private_key(ec.SECP256R1()))
    _check_rsa_size(rsa_bits)
    return RsaPrivate(rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits), alg)


def _alg(alg: Alg | str) -> Alg:
    try:
        return Alg(alg)
    except ValueError as exc:
        raise InvalidKeyError(f"unsupported algorithm {alg!r}") from exc
