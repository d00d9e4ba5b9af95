"""Deliberately bad readings for demos, each with the receipt the ingest side must send.

Each kind exercises one acceptance rule of docs/spec/reading-v1.md section 9. The ones that need an
earlier stored reading (a replay, a reused seq, a rollback) take the meter's last
*accepted* reading, so the outcome does not depend on timing.
"""

from __future__ import annotations

from dataclasses import replace
from enum import StrEnum
from typing import Final

from meterproof.meter.measurement import Measurement
from meterproof.schemas.reading import (
    ReceiptStatus,
    RejectReason,
    SignedReading,
    b64url,
    b64url_decode,
)

#: Far beyond the 300 s the spec tolerates.
CLOCK_SKEW_MS: Final = 3_600_000
ROLLBACK_WH: Final = 1_000


class Misbehaviour(StrEnum):
    BAD_SIGNATURE = "bad_signature"
    REPLAY = "replay"
    SEQ_REUSE = "seq_reuse"
    CLOCK_SKEW = "clock_skew"
    REGISTER_ROLLBACK = "register_rollback"


#: What the worker must answer. A replay is not an error: the reading is already stored.
EXPECTED: Final[dict[Misbehaviour, tuple[ReceiptStatus, RejectReason | None]]] = {
    Misbehaviour.BAD_SIGNATURE: (ReceiptStatus.REJECTED, RejectReason.BAD_SIGNATURE),
    Misbehaviour.REPLAY: (ReceiptStatus.DUPLICATE, None),
    Misbehaviour.SEQ_REUSE: (ReceiptStatus.REJECTED, RejectReason.SEQ_REUSED),
    Misbehaviour.CLOCK_SKEW: (ReceiptStatus.REJECTED, RejectReason.TIMESTAMP_SKEW),
    Misbehaviour.REGISTER_ROLLBACK: (ReceiptStatus.REJECTED, RejectReason.REGISTER_DECREASED),
}


def corrupt_signature(reading: SignedReading) -> SignedReading:
    """Flip one bit of the signature; the payload stays well-formed."""
    raw = bytearray(b64url_decode(reading.sig))
    raw[len(raw) // 2] ^= 0x01
    return reading.model_copy(update={"sig": b64url(bytes(raw))})


def skew_clock(measurement: Measurement) -> Measurement:
    return replace(measurement, ts=measurement.ts + CLOCK_SKEW_MS)


def roll_back(measurement: Measurement, last_accepted: SignedReading) -> Measurement | None:
    """Registers below the last stored ones at a later time; None if they are at zero."""
    if last_accepted.import_wh > 0:
        return replace(measurement, import_wh=max(0, last_accepted.import_wh - ROLLBACK_WH))
    if last_accepted.export_wh > 0:
        return replace(measurement, export_wh=max(0, last_accepted.export_wh - ROLLBACK_WH))
    return None
