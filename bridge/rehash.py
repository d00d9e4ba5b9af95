"""reading_hash recomputed from a stored row's fields, about 1 µs per reading.

`schemas.signing.signing_bytes` is the contract's definition, but it takes a validated
`SignedReading`, which costs more than the hash itself; `ledger verify` rehashes every
stored reading. This builds the same bytes (docs/spec/reading-v1.md section 6) straight from the
columns; tests pin it to `schemas.signing` on the spec's vectors and on random readings.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import Final

from meterproof.schemas.signing import MAGIC

_FIXED: Final = struct.Struct(">QQQQB")
_OPTIONAL: Final = tuple(struct.Struct(f">{n}q") for n in range(6))


def reading_hash(
    meter_id: str, fixed: tuple[int, int, int, int], optional: Sequence[int | None]
) -> bytes:
    """`fixed` is (seq, ts_ms, import_wh, export_wh) and `optional` holds power_w ..
    power_factor_milli (None when absent), both in signing-bytes order."""
    meter = meter_id.encode("ascii")
    mask = 0
    present: list[int] = []
    for bit, value in enumerate(optional):
        if value is not None:
            mask |= 1 << bit
            present.append(value)
    return hashlib.sha256(
        MAGIC
        + bytes((len(meter),))
        + meter
        + _FIXED.pack(*fixed, mask)
        + _OPTIONAL[len(present)].pack(*present)
    ).digest()
