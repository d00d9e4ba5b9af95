"""The stages before the store, composed once: decode (rules 1-2) -> verify (rules 3-6)
-> the replay fast path's split. Pure: the registry snapshots, the clock and what Redis
remembered are passed in.

The worker calls these on every batch (between its awaits for the key lookup and Redis),
the fuzzer on every hostile input, and the benchmarks to time each stage, so all three
run exactly the same composition.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from meterproof.ingest.decode import Decoded, decode
from meterproof.ingest.records import Candidate, Duplicate, Message, Rejection
from meterproof.ingest.replay import same_reading
from meterproof.ingest.verify import TimeBounds, verify
from meterproof.registry.snapshots import MeterSnapshot


def decode_all(messages: Iterable[Message]) -> tuple[list[Decoded], list[Rejection]]:
    """Rules 1-2 for each message, in order: (decoded, rejected)."""
    decoded: list[Decoded] = []
    rejected: list[Rejection] = []
    for message in messages:
        d = decode(message)
        if isinstance(d, Rejection):
            rejected.append(d)
        else:
            decoded.append(d)
    return decoded, rejected


def verify_all(
    decoded: Iterable[Decoded],
    meters: Mapping[str, MeterSnapshot | None],
    *,
    now_ms: int,
    bounds: TimeBounds,
) -> tuple[list[Candidate], list[Rejection]]:
    """Rules 3-6 for each decoded reading against the registry's `meters` (a meter absent
    from it is unknown): (candidates, rejected)."""
    candidates: list[Candidate] = []
    rejected: list[Rejection] = []
    for d in decoded:
        v = verify(d, meters.get(d.reading.meter_id), now_ms=now_ms, bounds=bounds)
        if isinstance(v, Rejection):
            rejected.append(v)
        else:
            candidates.append(v)
    return candidates, rejected


def check(
    message: Message,
    meters: Mapping[str, MeterSnapshot | None],
    *,
    now_ms: int,
    bounds: TimeBounds,
) -> Candidate | Rejection:
    """Rules 1-6 for one message."""
    d = decode(message)
    if isinstance(d, Rejection):
        return d
    return verify(d, meters.get(d.reading.meter_id), now_ms=now_ms, bounds=bounds)


def split_replayed(
    candidates: Sequence[Candidate], cached: Sequence[bytes | None]
) -> tuple[list[Duplicate], list[Candidate]]:
    """(duplicates Redis already knows with the same hash, candidates for the store);
    `cached[i]` is what Redis holds for `candidates[i]`. Anything else - a miss, another
    hash - is for the database to judge."""
    duplicates: list[Duplicate] = []
    to_store: list[Candidate] = []
    for c, hit in zip(candidates, cached, strict=True):
        if hit is not None and same_reading(hit, c.reading_hash):
            duplicates.append(Duplicate(c))
        else:
            to_store.append(c)
    return duplicates, to_store
