"""Time as the contract carries it: unix milliseconds on the wire (`ts`), `timestamptz` in
the database. Readings hold whole milliseconds, so both conversions are exact."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Final

_UNIX: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)


def wall_ms() -> int:
    """Now, in the wire's unit."""
    return time.time_ns() // 1_000_000


def ms_to_dt(ms: int) -> datetime:
    return _UNIX + timedelta(milliseconds=ms)


def dt_to_ms(dt: datetime) -> int:
    return (dt - _UNIX) // _MS
