"""Test hook: kill -9 this process at a named point of the anchoring protocol.

`METERPROOF_BRIDGE_CRASH_AT=before_submit|during_submit|after_submit` makes the bridge
SIGKILL itself right before it hands a pending batch to the sink, inside the sink's open
transaction (the evm sink: after broadcasting, before any receipt), or after the sink
acknowledged but before the receipt is recorded. The crash
tests restart the bridge without it and check that every batch is anchored exactly once.
Unset (always, outside tests) it does nothing.
"""

from __future__ import annotations

import os
import signal
from typing import Final, Literal

CRASH_ENV: Final = "METERPROOF_BRIDGE_CRASH_AT"

CrashPoint = Literal["before_submit", "during_submit", "after_submit"]


def crash_point(name: CrashPoint) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
