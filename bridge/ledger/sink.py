"""The seam between the bridge and a ledger: two calls, one receipt, two kinds of failure.

A sink must append entries in order and deduplicate on the idempotency key: a second
`submit` with a key it has already recorded returns the first receipt (and refuses a
different entry under the same key). That is all the bridge needs for exactly-once across
crashes. A chain adapter (Energy Market JSON-RPC, Substrate, EVM) is one more module that
implements this protocol; docs/anchoring.md lists what it has to map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from meterproof.bridge.entry import Entry
from meterproof.errors import MeterproofError

#: Bounded error codes: the only label a submission failure carries in logs and metrics.
ErrorCode = Literal[
    "unavailable",  # cannot reach the ledger or it timed out: retry
    "conflict",  # the key is recorded with a different entry
    "out_of_order",  # the entry does not extend the ledger's head
    "invalid_entry",  # bad signature, untrusted oracle key, mint hash, or a mint refused
    "unconfirmed",  # recorded, but not yet final (a chain: fewer than N blocks deep)
]


class SinkError(MeterproofError):
    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code: ErrorCode = code


class SinkUnavailableError(SinkError):
    """Transient: the bridge retries with backoff; nothing is lost meanwhile."""

    def __init__(self, detail: str) -> None:
        super().__init__("unavailable", detail)


class SinkPendingError(SinkError):
    """Recorded but not final yet: the bridge asks again soon (`fetch`), without backing off
    and without counting a failure; never a reason to submit again."""

    def __init__(self, detail: str) -> None:
        super().__init__("unconfirmed", detail)


class SinkRejectedError(SinkError):
    """The ledger refuses this entry: an operator must look. The bridge keeps retrying
    slowly and never skips the batch, so later batches wait behind it."""


@dataclass(frozen=True, slots=True)
class Receipt:
    sink: str
    position: int  #: the entry's place in the ledger (block, sequence number, ...)
    entry_hash: bytes
    reference: str  #: how to find it there (row, transaction hash, ...)
    recorded_at_ms: int

    def to_json(self) -> dict[str, Any]:
        return {
            "sink": self.sink,
            "position": self.position,
            "entry_hash": self.entry_hash.hex(),
            "reference": self.reference,
            "recorded_at_ms": self.recorded_at_ms,
        }

    @classmethod
    def from_json(cls, view: dict[str, Any]) -> Receipt:
        return cls(
            sink=str(view["sink"]),
            position=int(view["position"]),
            entry_hash=bytes.fromhex(view["entry_hash"]),
            reference=str(view["reference"]),
            recorded_at_ms=int(view["recorded_at_ms"]),
        )


class LedgerSink(Protocol):
    @property
    def name(self) -> str: ...

    def submit(self, entry: Entry, idempotency_key: str) -> Receipt:
        """Append the entry, or return the receipt of the identical entry under this key."""
        ...

    def fetch(self, idempotency_key: str) -> Receipt | None:
        """The receipt recorded under this key, if any."""
        ...

    def close(self) -> None: ...
