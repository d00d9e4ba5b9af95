"""Readings sent but not yet receipted, one file per reading, until the receipt arrives.

Format: a directory of `<seq, 20 digits>.json` files, each holding exactly the bytes that
were published. `ls` shows the backlog, `cat` shows what the meter signed, and nothing
else needs parsing: the reading hash is recomputed from the payload on load. A PUBACK is
not enough to drop a file (a broker killed with -9 loses what it acknowledged since its
last save); only a receipt is, because the worker sends it after the reading is stored.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from meterproof.errors import MeterproofError
from meterproof.meter.files import atomic_write
from meterproof.schemas.codec import MalformedPayload, decode_reading, encode_reading
from meterproof.schemas.reading import SignedReading
from meterproof.schemas.signing import reading_hash, signing_bytes


class OutboxError(MeterproofError):
    """An outbox file is not a reading this meter could have written."""


@dataclass(frozen=True, slots=True)
class Pending:
    seq: int
    reading_hash: str
    payload: bytes


def hash_of(reading: SignedReading) -> str:
    return reading_hash(signing_bytes(reading)).hex()


class Outbox:
    """The pending readings of `meter_id`: a folder holding another meter's is refused,
    since republishing them under this meter's certificate would get them refused as
    `topic_mismatch`, a final receipt that deletes them (a mixed-up `--state-dir`)."""

    def __init__(self, directory: Path, *, meter_id: str, durable: bool = True) -> None:
        self.directory = directory
        self.meter_id = meter_id
        self.durable = durable
        directory.mkdir(parents=True, exist_ok=True)
        self._entries = {entry.seq: entry for entry in self._load()}

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Pending]:
        """Oldest seq first, the order a backlog is uploaded in."""
        return iter(sorted(self._entries.values(), key=lambda entry: entry.seq))

    def get(self, seq: int) -> Pending | None:
        return self._entries.get(seq)

    def max_seq(self) -> int | None:
        return max(self._entries, default=None)

    def add(self, reading: SignedReading) -> Pending:
        """Persist before publishing, so that a crash right after cannot lose the reading."""
        if reading.seq in self._entries:
            raise OutboxError(f"seq {reading.seq} is already waiting for its receipt")
        entry = Pending(reading.seq, hash_of(reading), encode_reading(reading))
        atomic_write(self._path(entry.seq), entry.payload, durable=self.durable)
        self._entries[entry.seq] = entry
        return entry

    def settle(self, seq: int, digest: str) -> Pending | None:
        """Drop the entry this receipt is for; None if no pending reading matches both."""
        entry = self._entries.get(seq)
        if entry is None or entry.reading_hash != digest:
            return None
        del self._entries[seq]
        # No fsync: if the unlink is lost, the reading is republished and receipted as a
        # duplicate, which is harmless.
        self._path(seq).unlink(missing_ok=True)
        return entry

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:020d}.json"

    def _load(self) -> Iterator[Pending]:
        for path in self.directory.iterdir():
            if path.name.endswith(".tmp"):
                path.unlink()  # an interrupted write; its reading was never published
                continue
            payload = path.read_bytes()
            try:
                reading = decode_reading(payload)
            except MalformedPayload as exc:
                raise OutboxError(f"{path}: {exc}") from None
            if path.name != f"{reading.seq:020d}.json":
                raise OutboxError(f"{path}: holds seq {reading.seq}")
            if reading.meter_id != self.meter_id:
                raise OutboxError(
                    f"{path}: a reading of meter {reading.meter_id}, not {self.meter_id}"
                )
            yield Pending(reading.seq, hash_of(reading), payload)
