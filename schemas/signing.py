"""The signing bytes of docs/spec/reading-v1.md section 6 and the `reading_hash` that names
a reading."""

from __future__ import annotations

import hashlib
import struct
from typing import Final

from meterproof.schemas.reading import OPTIONAL_FIELDS, SignedReading

MAGIC: Final = b"SMR1"
_FIXED: Final = struct.Struct(">QQQQB")


def signing_bytes(reading: SignedReading) -> bytes:
    """Everything that is signed: `alg`, `kid` and `sig` are deliberately not part of it."""
    meter_id = reading.meter_id.encode("ascii")
    mask = 0
    optional: list[int] = []
    for bit, name in enumerate(OPTIONAL_FIELDS):
        value = getattr(reading, name)
        if value is not None:
            mask |= 1 << bit
            optional.append(value)
    return b"".join(
        (
            MAGIC,
            bytes((len(meter_id),)),
            meter_id,
            _FIXED.pack(reading.seq, reading.ts, reading.import_wh, reading.export_wh, mask),
            struct.pack(f">{len(optional)}q", *optional),
        )
    )


def reading_hash(message: bytes) -> bytes:
    """SHA-256 of the signing bytes; hex-encoded wherever it is shown."""
    return hashlib.sha256(message).digest()
