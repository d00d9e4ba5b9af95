"""The one policy, on plain values: boundaries, refusal reasons, wallet-wide consents,
ownership periods."""

from __future__ import annotations

from uuid import uuid4

import pytest

from meterproof.consent.model import Grant, Link, Refusal, Scope
from meterproof.consent.policy import ConsentView, live_audience, may_see, seen_range

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
HOUR = 3_600_000
A, B = "eip155:1:0xA", "eip155:1:0xB"


def _grant(**changes: object) -> Grant:
    values: dict[str, object] = {
        "id": uuid4(),
        "integrator": "acme",
        "meter_id": "m1",
        "account": None,
        "scopes": frozenset({Scope.LIVE}),
        "from_ms": T0,
        "to_ms": T0 + HOUR,
        "expires_ms": T0 + 2 * HOUR,
        **changes,
    }
    return Grant(**values)  # type: ignore[arg-type]


def _view(*grants: Grant, active: bool = True, links: list[Link] | None = None) -> ConsentView:
    return ConsentView(integrators={"acme": active}, grants=grants, links=links or [])


@pytest.mark.parametrize(
    ("ts", "now", "scope", "refusal"),
    [
        (T0, T0, Scope.LIVE, None),  # the period includes its start
        (T0 + HOUR - 1, T0, Scope.LIVE, None),
        (T0 + HOUR, T0, Scope.LIVE, Refusal.PERIOD),  # and excludes its end
        (T0 - 1, T0, Scope.LIVE, Refusal.PERIOD),
        (T0, T0 + 2 * HOUR - 1, Scope.LIVE, None),
        (T0, T0 + 2 * HOUR, Scope.LIVE, Refusal.EXPIRED),  # expired at its expiry
        (T0, T0, Scope.HISTORY, Refusal.SCOPE),
    ],
)
def test_a_consent_covers_its_scope_period_and_lifetime(
    ts: int, now: int, scope: Scope, refusal: Refusal | None
) -> None:
    decision = may_see("acme", "m1", ts, scope, view=_view(_grant()), now_ms=now)
    assert decision.refusal == refusal
    assert decision.allowed == (refusal is None)


def test_who_asks_and_for_which_meter() -> None:
    view = _view(_grant())
    assert may_see("acme", "m2", T0, Scope.LIVE, view=view, now_ms=T0).refusal == (
        Refusal.NO_CONSENT
    )
    assert may_see("other", "m1", T0, Scope.LIVE, view=view, now_ms=T0).refusal == (
        Refusal.UNKNOWN_INTEGRATOR
    )
    revoked = _view(_grant(), active=False)
    assert may_see("acme", "m1", T0, Scope.LIVE, view=revoked, now_ms=T0).refusal == (
        Refusal.INTEGRATOR_REVOKED
    )
    assert live_audience("m1", T0, revoked, T0) == []


def test_the_closest_miss_names_the_refusal_and_any_covering_consent_allows() -> None:
    expired = _grant(expires_ms=T0)
    wrong_scope = _grant(scopes=frozenset({Scope.LEDGER}))
    view = _view(expired, wrong_scope)
    assert may_see("acme", "m1", T0, Scope.LIVE, view=view, now_ms=T0).refusal == Refusal.SCOPE
    later = _grant(from_ms=T0 + HOUR, to_ms=None, expires_ms=None)
    view = _view(expired, wrong_scope, later)
    assert may_see("acme", "m1", T0, Scope.LIVE, view=view, now_ms=T0).refusal == Refusal.PERIOD
    allowed = may_see("acme", "m1", T0 + HOUR, Scope.LIVE, view=view, now_ms=T0)
    assert allowed.consent == later.id


def test_a_wallet_wide_consent_covers_the_meters_linked_now() -> None:
    wide = _grant(meter_id=None, account=A)
    links = [Link(m, owner, T0 - HOUR, None) for m, owner in (("m1", A), ("m2", A), ("m3", B))]
    view = _view(wide, links=links)
    assert [may_see("acme", m, T0, Scope.LIVE, view=view, now_ms=T0).allowed
            for m in ("m1", "m2", "m3")] == [True, True, False]  # fmt: skip
    assert live_audience("m2", T0, view, T0) == ["acme"]
    assert live_audience("m2", T0 + HOUR, view, T0) == []  # outside the period


@pytest.mark.parametrize(
    ("grants", "span", "now", "seen"),
    [
        ([_grant()], (T0, T0 + HOUR), T0, (T0, T0 + HOUR)),  # exactly the period
        ([_grant()], (T0 - 1, T0 + HOUR), T0, (T0, T0 + HOUR)),  # starts before it
        ([_grant()], (T0, T0 + HOUR + 1), T0, (T0, T0 + HOUR)),  # ends after it
        ([_grant()], (T0 + 2 * HOUR, T0 + 3 * HOUR), T0, None),  # none of it
        ([_grant(to_ms=None)], (T0 + HOUR, T0 + 99 * HOUR), T0, (T0 + HOUR, T0 + 99 * HOUR)),
        ([_grant()], (T0, T0 + HOUR), T0 + 2 * HOUR, None),  # expired
        ([_grant(scopes=frozenset({Scope.HISTORY}))], (T0, T0 + HOUR), T0, None),  # scope
        ([_grant(to_ms=T0 + 1), _grant(from_ms=T0 + 1)], (T0, T0 + HOUR), T0, (T0, T0 + HOUR)),
        ([_grant(to_ms=T0 + 1), _grant(from_ms=T0 + 2)], (T0, T0 + HOUR), T0, None),  # a gap
        # another consent, expired: the whole span is still seen, a part of it is not
        ([_grant(), _grant(expires_ms=T0)], (T0, T0 + HOUR), T0, (T0, T0 + HOUR)),
        ([_grant(), _grant(expires_ms=T0)], (T0 - 1, T0 + HOUR), T0, None),
        ([_grant(), _grant(scopes=frozenset({Scope.HISTORY}))], (T0 - 1, T0 + HOUR), T0, None),
    ],
)
def test_a_span_is_seen_in_one_range_that_the_policy_allows_whole(
    grants: list[Grant], span: tuple[int, int], now: int, seen: tuple[int, int] | None
) -> None:
    """When it names a range, `may_see` allows every time in it and refuses every other
    time of the span for its period only, which leaves the reading out without refusing
    the read; otherwise the read is left to `may_see` per reading."""
    view = _view(*grants)
    assert seen_range("acme", "m1", *span, Scope.LIVE, view=view, now_ms=now) == seen
    if seen is not None:
        for ts in (seen[0], (seen[0] + seen[1]) // 2, seen[1] - 1):
            assert may_see("acme", "m1", ts, Scope.LIVE, view=view, now_ms=now).allowed
        for ts in (span[0], seen[0] - 1, seen[1], span[1] - 1):
            if span[0] <= ts < span[1] and not seen[0] <= ts < seen[1]:
                refused = may_see("acme", "m1", ts, Scope.LIVE, view=view, now_ms=now)
                assert refused.refusal is Refusal.PERIOD, ts
    assert seen_range("acme", "m1", *span, Scope.LIVE, view=_view(*grants, active=False),
                      now_ms=now) is None  # fmt: skip
    assert seen_range("other", "m1", *span, Scope.LIVE, view=view, now_ms=now) is None


#: m1 was A's from T0 - HOUR, and is B's from T0 + HOUR.
SOLD = [Link("m1", A, T0 - HOUR, T0 + HOUR), Link("m1", B, T0 + HOUR, None)]


@pytest.mark.parametrize(
    ("granted_by", "ts", "refusal"),
    [
        (A, T0 - HOUR, None),  # the seller's consent: the seller's time
        (A, T0 + HOUR - 1, None),
        (A, T0 + HOUR, Refusal.PERIOD),  # not the buyer's, however open-ended
        (A, T0 - HOUR - 1, Refusal.PERIOD),  # nor before the seller's link
        (B, T0 + HOUR, None),  # the buyer's consent from 1970: the buyer's time
        (B, T0 + HOUR - 1, Refusal.PERIOD),  # not the seller's
        (None, T0 - 2 * HOUR, None),  # the operator's: its own period alone
        (None, T0 + 2 * HOUR, None),
    ],
)
def test_an_owners_meter_consent_covers_only_the_time_the_owner_held_the_meter(
    granted_by: str | None, ts: int, refusal: Refusal | None
) -> None:
    view = _view(_grant(from_ms=0, to_ms=None, granted_by=granted_by), links=SOLD)
    assert may_see("acme", "m1", ts, Scope.LIVE, view=view, now_ms=T0).refusal == refusal
    assert live_audience("m1", ts, view, T0) == ([] if refusal else ["acme"])


def test_a_wallet_wide_consent_covers_a_meter_from_its_link_only() -> None:
    view = _view(_grant(meter_id=None, account=B, from_ms=0, to_ms=None), links=SOLD)
    assert may_see("acme", "m1", T0 + HOUR - 1, Scope.LIVE, view=view, now_ms=T0).refusal == (
        Refusal.PERIOD
    )
    assert may_see("acme", "m1", T0 + HOUR, Scope.LIVE, view=view, now_ms=T0).allowed
    span = (0, T0 + 2 * HOUR)
    assert seen_range("acme", "m1", *span, Scope.LIVE, view=view, now_ms=T0) == (
        T0 + HOUR, T0 + 2 * HOUR
    )  # fmt: skip


@pytest.mark.parametrize(
    "grant",
    [
        _grant(from_ms=0, to_ms=None, granted_by=A),
        _grant(meter_id=None, account=A, from_ms=0, to_ms=None),
    ],
    ids=["meter", "wallet"],
)
def test_a_span_is_seen_whole_only_within_one_period_of_ownership(grant: Grant) -> None:
    """A, then B, then A again: each of A's periods is seen whole; a span across B's is
    left to the policy per reading, which refuses B's time."""
    links = [
        Link("m1", A, T0, T0 + HOUR),
        Link("m1", B, T0 + HOUR, T0 + 2 * HOUR),
        Link("m1", A, T0 + 2 * HOUR, None),
    ]
    view = _view(grant, links=links)

    def seen(lo: int, hi: int) -> tuple[int, int] | None:
        return seen_range("acme", "m1", lo, hi, Scope.LIVE, view=view, now_ms=T0)

    assert seen(0, T0 + HOUR + 1) == (T0, T0 + HOUR)
    assert seen(T0 + HOUR, T0 + 3 * HOUR) == (T0 + 2 * HOUR, T0 + 3 * HOUR)
    assert seen(T0, T0 + 3 * HOUR) is None  # two ranges
    assert seen(T0 + HOUR, T0 + 2 * HOUR) is None  # none of it
    for ts, allowed in ((T0, True), (T0 + HOUR, False), (T0 + 2 * HOUR - 1, False),
                        (T0 + 2 * HOUR, True)):  # fmt: skip
        assert may_see("acme", "m1", ts, Scope.LIVE, view=view, now_ms=T0).allowed == allowed
