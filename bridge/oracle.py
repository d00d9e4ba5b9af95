"""The oracle's Ed25519 key pair from the PKI (`certs init` creates it): the private key
signs entry headers; the raw 32-byte public key goes into every header and is published."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from meterproof.schemas.signatures import (
    Ed25519Public,
    InvalidKeyError,
    PrivateKey,
    load_private_key,
    load_public_key,
)


@dataclass(frozen=True, slots=True)
class Oracle:
    key: PrivateKey
    public_key: bytes


def load_oracle(key_path: Path) -> Oracle:
    try:
        key = load_private_key("EdDSA", key_path.read_bytes())
    except OSError as exc:
        raise InvalidKeyError(f"oracle key {key_path}: {exc.strerror}; run `certs init`") from None
    public = key.public_key()
    assert isinstance(public, Ed25519Public)
    return Oracle(key, public.raw)


def load_oracle_public(pub_path: Path) -> bytes:
    """The published oracle key (PEM) as the raw bytes headers carry."""
    try:
        public = load_public_key("EdDSA", pub_path.read_bytes())
    except OSError as exc:
        raise InvalidKeyError(f"oracle public key {pub_path}: {exc.strerror}") from None
    assert isinstance(public, Ed25519Public)
    return public.raw


def describe(public_key: bytes) -> str:
    """How the key is printed everywhere: `ed25519:<64 hex digits>`."""
    return f"ed25519:{public_key.hex()}"
