"""Rules 7-9 with plain values: duplicates, seq reuse, register order, density in meter time."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cache

import pytest

from meterproof.ingest.judge import RateLimit, StoredContext, StoredPoint, context_of, judge
from meterproof.ingest.records import Accepted, Candidate, Duplicate, Message, Outcome, Rejection
from meterproof.schemas.codec import sign_reading
from meterproof.schemas.reading import Alg
from meterproof.schemas.signatures import PrivateKey, generate_private_key
from meterproof.schemas.signing import reading_hash, signing_bytes

T0 = 1_767_225_600_000


@cache
def _key() -> PrivateKey:
    return generate_private_key(Alg.EDDSA)


def cand(seq: int, ts: int, imp: int, exp: int, meter: str = "m1") -> Candidate:
    reading = sign_reading(
        {"meter_id": meter, "seq": seq, "ts": ts, "import_wh": imp, "export_wh": exp}, _key()
    )
    message = signing_bytes(reading)
    return Candidate(
        Message(f"meters/{meter}/readings", b"", T0), reading, message, reading_hash(message), T0
    )


def decide(
    batch: list[Candidate],
    *,
    seen: Mapping[tuple[str, int], bytes],
    history: Mapping[str, Iterable[StoredPoint]],
    limit: RateLimit,
) -> list[Outcome]:
    """Judged against stored readings held in memory (`test_ingest_store` holds the
    database's contexts equal to these)."""
    return judge(batch, context_of(batch, seen=seen, history=history, limit=limit), limit=limit)


def reasons(outcomes: list[Outcome]) -> list[str]:
    out = []
    for o in outcomes:
        if isinstance(o, Rejection):
            out.append(o.reason.value)
        else:
            out.append("accepted" if isinstance(o, Accepted) else "duplicate")
    return out


def test_duplicate_and_seq_reused_against_the_store_and_within_a_batch() -> None:
    stored = cand(1, T0, 10, 0)
    batch = [
        cand(1, T0, 10, 0),  # same bytes again: duplicate
        cand(1, T0 + 1, 10, 0),  # same seq, other content: seq_reused
        cand(2, T0 + 5000, 11, 0),
        cand(2, T0 + 5000, 11, 0),  # redelivered inside the batch
        cand(2, T0 + 6000, 12, 0),  # reused inside the batch
    ]
    out = decide(
        batch,
        seen={("m1", 1): stored.reading_hash},
        history={"m1": [StoredPoint(T0, 10, 0)]},
        limit=RateLimit(),
    )
    assert reasons(out) == ["duplicate", "seq_reused", "accepted", "duplicate", "seq_reused"]
    assert isinstance(out[0], Duplicate)


def test_registers_never_decrease_in_ts_order_even_out_of_order() -> None:
    history = {"m1": [StoredPoint(T0, 100, 50), StoredPoint(T0 + 20_000, 200, 60)]}
    batch = [
        cand(10, T0 + 10_000, 150, 55),  # fits between: accepted (late arrival)
        cand(11, T0 + 12_000, 140, 55),  # below the one just accepted at T0+10s
        cand(12, T0 + 15_000, 210, 55),  # above the later stored reading
        cand(13, T0 + 30_000, 199, 70),  # import below the latest stored
        cand(14, T0 + 30_000, 200, 70),  # equal registers are fine
    ]
    out = decide(batch, seen={}, history=history, limit=RateLimit())
    assert reasons(out) == [
        "accepted",
        "register_decreased",
        "register_decreased",
        "register_decreased",
        "accepted",
    ]


def test_rate_limit_counts_meter_time_not_arrival() -> None:
    limit = RateLimit(window_ms=10_000, max_readings=3)
    flood = [cand(i, T0 + i, 1, 1) for i in range(1, 6)]  # 5 readings within 5 ms of ts
    assert reasons(decide(flood, seen={}, history={}, limit=limit)) == [
        "accepted",
        "accepted",
        "accepted",
        "rate_limited",
        "rate_limited",
    ]
    backlog = [cand(i, T0 + i * 5_000, i, 0) for i in range(1, 200)]  # a week-like backlog
    assert set(reasons(decide(backlog, seen={}, history={}, limit=limit))) == {"accepted"}


def test_meters_are_independent() -> None:
    out = decide(
        [cand(1, T0, 5, 5, "a"), cand(1, T0, 1, 1, "b")],
        seen={},
        history={"a": [StoredPoint(T0 - 1, 4, 4)], "b": [StoredPoint(T0 - 1, 2, 2)]},
        limit=RateLimit(),
    )
    assert reasons(out) == ["accepted", "register_decreased"]


def test_stored_window_count_and_this_batch_add_up() -> None:
    limit = RateLimit(window_ms=10_000, max_readings=3)
    history = {"m1": [StoredPoint(T0 - 9_000, 1, 1), StoredPoint(T0 - 5_000, 1, 1)]}
    batch = [cand(10, T0, 1, 1), cand(11, T0 + 1, 1, 1), cand(12, T0 + 9_001, 1, 1)]
    # at T0: 2 stored in the window, accepted; T0+1: 2 stored + 1 of this batch, limited;
    # T0+9,001: the window (T0-999 .. T0+9,001] holds only T0 of this batch, accepted
    assert reasons(decide(batch, seen={}, history=history, limit=limit)) == [
        "accepted",
        "rate_limited",
        "accepted",
    ]


def test_one_context_per_candidate_is_required() -> None:
    with pytest.raises(ValueError, match="2 candidates but 1 stored contexts"):
        judge(
            [cand(1, T0, 1, 1), cand(2, T0 + 1, 1, 1)],
            [StoredContext(None, 0, None, None)],
            limit=RateLimit(),
        )
