"""The meter's nonce counter, written ahead so that a restarted meter never reuses a `seq`.

`take()` persists the *next* value before handing out the current one: a crash between
the two loses a number (a gap, which the spec allows) but can never hand the same number
out twice, which the ingest side would reject as `seq_reused` and record as a critical
security event.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final

from meterproof.errors import MeterproofError
from meterproof.meter.files import atomic_write
from meterproof.schemas.reading import U64_MAX

FIRST_SEQ: Final = 1


class StateError(MeterproofError):
    """The state file is unreadable: refuse to guess a nonce, an operator must look."""


class SeqState:
    """`state.json` = `{"next_seq": N}`; every seq below N may already have been used.

    `block` seqs are reserved per write: 1 writes before every reading; more saves writes
    (and flash wear) at the price of a gap after a restart - never a reuse.
    """

    def __init__(self, path: Path, *, durable: bool = True, block: int = 1) -> None:
        if block < 1:
            raise ValueError(f"block must be at least 1, not {block}")
        self.path = path
        self.durable = durable
        self.block = block
        self._reserved = self._load()
        self._next = self._reserved

    def take(self) -> int:
        """The next unused seq, already marked used on disk."""
        seq = self._next
        if seq >= self._reserved:
            if seq >= U64_MAX:
                raise StateError(f"{self.path}: seq space exhausted")
            self._store(min(seq + self.block, U64_MAX))
        self._next = seq + 1
        return seq

    def advance_past(self, seq: int) -> None:
        """Never hand out `seq` or anything below it (e.g. seqs found in the outbox)."""
        if seq >= self._next:
            self._next = seq + 1
        if self._next > self._reserved:
            self._store(self._next)

    def _store(self, reserved: int) -> None:
        atomic_write(self.path, json.dumps({"next_seq": reserved}).encode(), durable=self.durable)
        self._reserved = reserved

    def _load(self) -> int:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return FIRST_SEQ
        try:
            value = json.loads(raw)["next_seq"]
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(f"{self.path}: not a seq state file ({exc})") from None
        if not isinstance(value, int) or not FIRST_SEQ <= value <= U64_MAX:
            raise StateError(f"{self.path}: next_seq {value!r} is out of range")
        return value
