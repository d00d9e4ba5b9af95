"""Rules 7-9 with plain values: duplicates, seq reuse, register order, density in meter time."""

from __future__ import annotations

import random
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
        history={"m1": [StoredPoint(T0, 10, 0, 1)]},
        limit=RateLimit(),
    )
    assert reasons(out) == ["duplicate", "seq_reused", "accepted", "duplicate", "seq_reused"]
    assert isinstance(out[0], Duplicate)


def test_registers_never_decrease_in_ts_order_even_out_of_order() -> None:
    history = {"m1": [StoredPoint(T0, 100, 50, 1), StoredPoint(T0 + 20_000, 200, 60, 2)]}
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
        history={"a": [StoredPoint(T0 - 1, 4, 4, 0)], "b": [StoredPoint(T0 - 1, 2, 2, 0)]},
        limit=RateLimit(),
    )
    assert reasons(out) == ["accepted", "register_decreased"]


def test_stored_window_count_and_this_batch_add_up() -> None:
    limit = RateLimit(window_ms=10_000, max_readings=3)
    history = {"m1": [StoredPoint(T0 - 9_000, 1, 1, 1), StoredPoint(T0 - 5_000, 1, 1, 2)]}
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


def test_rate_limit_counts_every_window_that_holds_the_reading() -> None:
    """A window ending at the reading is not the only one: readings stored or accepted
    after it count as well, in any window of the limit's length that holds it."""
    limit = RateLimit(window_ms=10_000, max_readings=3)
    falling = [cand(i, T0 - i, 100 - i, 0) for i in range(1, 6)]  # ts going down
    assert reasons(decide(falling, seen={}, history={}, limit=limit)) == [
        "accepted", "accepted", "accepted", "rate_limited", "rate_limited",
    ]  # fmt: skip
    # stored at +1 s, +2 s, +3 s: a late reading at 0 makes 4 in [0, 9.999 s]; at -7.001 s
    # the windows holding it end by +2.998 s (two stored companions): accepted; at -7.5 s,
    # [-7.5 s, 2.499 s] holds it, -7.001 s of this batch, +1 s and +2 s
    history = {"m1": [StoredPoint(T0 + s * 1000, 10, 0, s) for s in (1, 2, 3)]}
    late = [cand(4, T0, 10, 0), cand(5, T0 - 7_001, 10, 0), cand(6, T0 - 7_500, 10, 0)]
    assert reasons(decide(late, seen={}, history=history, limit=limit)) == [
        "rate_limited", "accepted", "rate_limited",
    ]  # fmt: skip
    # a reading a whole window after is in no window with it
    history = {"m1": [StoredPoint(T0 + 10_000, 10, 0, s) for s in (1, 2, 3)]}
    assert reasons(decide([cand(4, T0, 10, 0)], seen={}, history=history, limit=limit)) == [
        "accepted"
    ]


def _over_some_window(times: list[int], ts: int, limit: RateLimit) -> bool:
    """Rule 9 by brute force: some window of the limit's length holding `ts` would hold
    more than the limit."""
    return any(
        sum(1 for t in [*times, ts] if start <= t < start + limit.window_ms) > limit.max_readings
        for start in range(ts - limit.window_ms + 1, ts + 1)
    )


@pytest.mark.parametrize("seed", range(6))
def test_rate_limit_equals_a_brute_force_count_in_any_arrival_order(seed: int) -> None:
    """Readings in random order, split at random between what is stored and batches of
    arrival: each verdict equals the brute force over what was accepted before it."""
    rng = random.Random(seed)
    limit = RateLimit(window_ms=50, max_readings=rng.choice([1, 2, 4]))
    times = [T0 + rng.randrange(0, 300) for _ in range(120)]
    order = [cand(seq, ts, 7, 7) for seq, ts in enumerate(times, start=1)]
    history: dict[str, list[StoredPoint]] = {"m1": []}
    accepted: list[int] = []
    verdicts: list[str] = []
    expected: list[str] = []
    while order:
        size = rng.randrange(1, 12)
        batch, order = order[:size], order[size:]
        for c in batch:
            over = _over_some_window(accepted, c.reading.ts, limit)
            expected.append("rate_limited" if over else "accepted")
            if not over:
                accepted.append(c.reading.ts)
        outcomes = decide(batch, seen={}, history=history, limit=limit)
        verdicts += reasons(outcomes)
        history["m1"] += [
            StoredPoint(o.candidate.reading.ts, 7, 7, o.candidate.reading.seq)
            for o in outcomes
            if isinstance(o, Accepted)
        ]
    assert verdicts == expected
    assert "rate_limited" in verdicts


def test_readings_with_equal_ts_are_ordered_by_seq() -> None:
    history = {"m1": [StoredPoint(T0, 500, 0, 1), StoredPoint(T0 + 2000, 700, 0, 5)]}
    batch = [
        cand(2, T0, 100, 0),  # after seq 1 at the same ts: below its 500
        cand(3, T0 + 1000, 200, 0),  # after seq 1, seq 2 refused: below 500
        cand(4, T0 + 2000, 800, 0),  # before seq 5 at the same ts: above its 700
        cand(6, T0 + 2000, 700, 0),  # after seq 5: equal registers are fine
        cand(7, T0 + 2000, 600, 0),  # after seq 6 of this batch: below its 700
    ]
    assert reasons(decide(batch, seen={}, history=history, limit=RateLimit())) == [
        "register_decreased", "register_decreased", "register_decreased", "accepted",
        "register_decreased",
    ]  # fmt: skip


def test_a_meter_halted_under_the_lock_has_its_readings_refused_first() -> None:
    batch = [cand(1, T0, 1, 1), cand(1, T0, 1, 1, "gone"), cand(1, T0, 1, 1, "ok")]
    contexts = [StoredContext(batch[0].reading_hash, 0, None, None)] + [
        StoredContext(None, 0, None, None)
    ] * 2
    out = judge(batch, contexts, limit=RateLimit(), halted={"m1": "quarantined", "gone": None})
    assert reasons(out) == ["meter_not_active", "unknown_meter", "accepted"]
    assert [o.detail for o in out if isinstance(o, Rejection)] == [
        "meter status is quarantined",
        "meter is not registered",
    ]


def test_a_context_without_the_stored_readings_a_late_reading_needs_is_refused() -> None:
    after = StoredPoint(T0 + 1, 5, 5, 2)
    limit = RateLimit(window_ms=10_000, max_readings=3)
    with pytest.raises(ValueError, match="need `ahead`"):
        judge([cand(1, T0, 1, 1)], [StoredContext(None, 0, None, after)], limit=limit)
    # three stored within a window either side: with it, four, which could fill one
    with pytest.raises(ValueError, match="need `around`"):
        judge([cand(1, T0, 1, 1)], [StoredContext(None, 2, None, after, 1)], limit=limit)
    out = judge([cand(1, T0, 1, 1)], [StoredContext(None, 1, None, after, 1)], limit=limit)
    assert reasons(out) == ["accepted"]  # two stored within a window either side: too few


def test_a_drain_split_over_two_workers_needs_no_stored_times() -> None:
    """Readings 5 s apart dealt alternately to two workers, one of which stored its share
    first: every reading of the other is late, and none is near enough a full window to
    need the stored times (the second statement)."""
    stored = [StoredPoint(T0 + s * 5_000, s, 0, s) for s in range(2, 200, 2)]
    batch = [cand(s, T0 + s * 5_000, s, 0) for s in range(1, 200, 2)]
    contexts = context_of(batch, seen={}, history={"m1": stored}, limit=RateLimit())
    assert all(c.ahead is not None and c.around is None for c in contexts[:-1])
    assert contexts[-1].ahead is None  # nothing stored after the last: the one count
    assert set(reasons(judge(batch, contexts, limit=RateLimit()))) == {"accepted"}
    dense = RateLimit(window_ms=60_000, max_readings=20)  # 24 within a window either side
    contexts = context_of(batch, seen={}, history={"m1": stored}, limit=dense)
    assert all(c.around is not None for c in contexts[6:-6])
