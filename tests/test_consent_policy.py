"""The one policy, on plain values: boundaries, refusal reasons, wallet-wide consents."""

from __future__ import annotations

from uuid import uuid4

import pytest

from meterproof.consent.model import Grant, Refusal, Scope
from meterproof.consent.policy import ConsentView, live_audience, may_see, sees_span

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
HOUR = 3_600_000


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


def _view(*grants: Grant, active: bool = True, links: dict[str, str] | None = None) -> ConsentView:
    return ConsentView(integrators={"acme": active}, grants=grants, links=links or {})


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
    wide = _grant(meter_id=None, account="eip155:1:0xA")
    view = _view(wide, links={"m1": "eip155:1:0xA", "m2": "eip155:1:0xA", "m3": "eip155:1:0xB"})
    assert [may_see("acme", m, T0, Scope.LIVE, view=view, now_ms=T0).allowed
            for m in ("m1", "m2", "m3")] == [True, True, False]  # fmt: skip
    assert live_audience("m2", T0, view, T0) == ["acme"]
    assert live_audience("m2", T0 + HOUR, view, T0) == []  # outside the period


@pytest.mark.parametrize(
    ("grants", "span", "now", "whole"),
    [
        ([_grant()], (T0, T0 + HOUR), T0, True),  # exactly the period
        ([_grant()], (T0 - 1, T0 + HOUR), T0, False),  # starts before it
        ([_grant()], (T0, T0 + HOUR + 1), T0, False),  # ends after it
        ([_grant(to_ms=None)], (T0 + HOUR, T0 + 99 * HOUR), T0, True),  # open-ended
        ([_grant()], (T0, T0 + HOUR), T0 + 2 * HOUR, False),  # expired
        ([_grant(scopes=frozenset({Scope.HISTORY}))], (T0, T0 + HOUR), T0, False),  # scope
        ([_grant(to_ms=T0 + 1), _grant(from_ms=T0 + 1)], (T0, T0 + HOUR), T0, False),  # two
    ],
)
def test_a_span_is_seen_whole_only_inside_one_covering_consent(
    grants: list[Grant], span: tuple[int, int], now: int, whole: bool
) -> None:
    """When it says whole, `may_see` allows every time of the span; two consents that
    cover it only together leave it to `may_see` per reading."""
    view = _view(*grants)
    assert sees_span("acme", "m1", *span, Scope.LIVE, view=view, now_ms=now) == whole
    if whole:
        for ts in (span[0], (span[0] + span[1]) // 2, span[1] - 1):
            assert may_see("acme", "m1", ts, Scope.LIVE, view=view, now_ms=now).allowed
    assert not sees_span("acme", "m1", *span, Scope.LIVE, view=_view(*grants, active=False),
                         now_ms=now)  # fmt: skip
    assert not sees_span("other", "m1", *span, Scope.LIVE, view=view, now_ms=now)
