"""A capture: payload files a meter produced (one PUBLISH payload per file, named so
that they sort in the order sent) and the meter's public signing key."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from meterproof.conformance.observations import Observation, Published
from meterproof.errors import InputError
from meterproof.schemas import topics
from meterproof.schemas.reading import Alg
from meterproof.schemas.signatures import InvalidKeyError, PublicKey, load_public_key


def key_for(pem: bytes, alg: Alg | None) -> PublicKey:
    """The public key bound to `alg`, or to the one algorithm its type allows; an RSA key
    needs `alg` (RS256 or PS256)."""
    if alg is None:
        try:
            raw = serialization.load_pem_public_key(pem)
        except ValueError as exc:
            raise InputError(f"not a PEM public key: {exc}") from None
        if isinstance(raw, ed25519.Ed25519PublicKey):
            alg = Alg.EDDSA
        elif isinstance(raw, ec.EllipticCurvePublicKey):
            alg = Alg.ES256
        elif isinstance(raw, rsa.RSAPublicKey):
            raise InputError("an RSA key signs RS256 or PS256: say which with --alg")
        else:
            raise InputError(f"a {type(raw).__name__} is not a reading-v1 signing key")
    try:
        return load_public_key(alg, pem)
    except InvalidKeyError as exc:
        raise InputError(str(exc)) from None


def load_capture(directory: Path, key: PublicKey, meter_id: str | None) -> Observation:
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InputError(f"{directory}: no payload files")
    published = [
        Published(
            float(i), "" if meter_id is None else topics.readings(meter_id), path.read_bytes()
        )
        for i, path in enumerate(files)
    ]
    return Observation(meter_id, key, published)
