"""The one decision every door asks: may integrator X see reading R for scope S?

The MQTT live feed (ingest/audience.py) and the HTTP API's reads and streams all call
`may_see`; none of them filters by itself. `ConsentView` is a snapshot of the active
consents, resolved to meters through the *current* wallet links, so a meter that changes
owner leaves the old owner's wallet-wide consents at once; and bounded by the link
history, so a consent that rests on a wallet's ownership shows a meter's readings only
from the times that wallet owned it: neither a buyer's consent the seller's years, nor
the seller's consent the buyer's.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Set
from dataclasses import replace

from meterproof.consent.model import Decision, Grant, Link, Refusal, Scope

_NOBODY: frozenset[str] = frozenset()


class ConsentView:
    """Active grants indexed by (integrator, meter) and by meter; immutable once built."""

    def __init__(
        self,
        *,
        integrators: Mapping[str, bool],
        grants: Iterable[Grant],
        links: Iterable[Link],
    ) -> None:
        """`integrators`: name -> active; `links`: every link, past and current, of the
        accounts the grants rest on. Each grant is bound here, per meter, to the periods
        its owner held that meter, so `may_see` does no more work per reading."""
        self._integrators = dict(integrators)
        meters_of: dict[str, list[str]] = defaultdict(list)  # account -> meters linked now
        held: dict[tuple[str, str], list[tuple[int, int | None]]] = defaultdict(list)
        for link in links:
            held[link.account, link.meter_id].append((link.from_ms, link.to_ms))
            if link.to_ms is None:
                meters_of[link.account].append(link.meter_id)
        self._grants: dict[tuple[str, str], list[Grant]] = defaultdict(list)
        self._audience: dict[str, set[str]] = defaultdict(set)
        for grant in grants:
            if grant.meter_id is not None:
                meters = [grant.meter_id]
            else:
                meters = meters_of.get(grant.account or "", [])
            owner = grant.owner
            for meter_id in meters:
                bound = grant
                if owner is not None:
                    bound = replace(grant, owned=tuple(held.get((owner, meter_id), ())))
                self._grants[grant.integrator, meter_id].append(bound)
                if Scope.LIVE in grant.scopes and self._integrators.get(grant.integrator):
                    self._audience[meter_id].add(grant.integrator)
        self.size = sum(len(g) for g in self._grants.values())

    def integrator_active(self, name: str) -> bool | None:
        """True, False (revoked), or None (unknown)."""
        return self._integrators.get(name)

    def grants(self, integrator: str, meter_id: str) -> list[Grant]:
        return self._grants.get((integrator, meter_id), [])

    def live_candidates(self, meter_id: str) -> Set[str]:
        """Integrators with some live grant for the meter: each still goes through
        `may_see`, which checks the reading's time and the expiry."""
        return self._audience.get(meter_id, _NOBODY)  # per reading: allocate nothing


EMPTY = ConsentView(integrators={}, grants=(), links=())


def may_see(
    integrator: str, meter_id: str, ts_ms: int, scope: Scope, *, view: ConsentView, now_ms: int
) -> Decision:
    """Allowed when an active, unexpired consent of `integrator` covers the meter, the
    scope and the reading time `ts_ms`; otherwise the most specific refusal."""
    active = view.integrator_active(integrator)
    if active is None:
        return Decision(refusal=Refusal.UNKNOWN_INTEGRATOR)
    if not active:
        return Decision(refusal=Refusal.INTEGRATOR_REVOKED)
    refusal = Refusal.NO_CONSENT
    for grant in view.grants(integrator, meter_id):
        if grant.expired(now_ms):
            refusal = min(refusal, Refusal.EXPIRED, key=_SPECIFICITY.__getitem__)
        elif scope not in grant.scopes:
            refusal = min(refusal, Refusal.SCOPE, key=_SPECIFICITY.__getitem__)
        elif not grant.covers_time(ts_ms):
            refusal = min(refusal, Refusal.PERIOD, key=_SPECIFICITY.__getitem__)
        else:
            return Decision(consent=grant.id)
    return Decision(refusal=refusal)


def seen_range(
    integrator: str,
    meter_id: str,
    from_ms: int,
    to_ms: int,
    scope: Scope,
    *,
    view: ConsentView,
    now_ms: int,
) -> tuple[int, int] | None:
    """The one range of [from_ms, to_ms) whose every time `may_see` allows, when `may_see`
    refuses every other time of it for its period alone; a read of the span then shows
    exactly that range's readings, with no decision per reading. The integrator's active,
    unexpired consents of `scope` on the meter, each within its owner's periods and
    clipped to the span, must join into one range: the whole span, or a part of it when
    the integrator has no other consent on the meter (an expired or differently scoped
    one could outrank "period" as the refusal, and that refuses the whole read). None
    only means "ask per reading"; it refuses nothing."""
    if not view.integrator_active(integrator):
        return None
    grants = view.grants(integrator, meter_id)
    usable = [g for g in grants if not g.expired(now_ms) and scope in g.scopes]
    parts = sorted(
        (max(lo, from_ms), to_ms if hi is None else min(hi, to_ms))
        for g in usable
        for lo, hi in _covered(g)
    )
    joined: tuple[int, int] | None = None
    for lo, hi in parts:
        if lo >= hi:
            continue
        if joined is not None and lo > joined[1]:
            return None  # a gap between two consents: two ranges
        joined = (lo, hi) if joined is None else (joined[0], max(joined[1], hi))
    if joined is None or (joined != (from_ms, to_ms) and len(usable) < len(grants)):
        return None
    return joined


def _covered(grant: Grant) -> list[tuple[int, int | None]]:
    """The periods `covers_time` allows: the grant's own, within each its owner held."""
    if grant.owned is None:
        return [(grant.from_ms, grant.to_ms)]
    return [(max(grant.from_ms, lo), _end(grant.to_ms, hi)) for lo, hi in grant.owned]


def _end(a: int | None, b: int | None) -> int | None:
    """The earlier of two exclusive ends, None being open."""
    return b if a is None else a if b is None else min(a, b)


def live_audience(meter_id: str, ts_ms: int, view: ConsentView, now_ms: int) -> list[str]:
    """The integrators who receive this reading on their live feed, sorted."""
    return sorted(
        name
        for name in view.live_candidates(meter_id)
        if may_see(name, meter_id, ts_ms, Scope.LIVE, view=view, now_ms=now_ms).allowed
    )


#: When several consents refuse, the one closest to allowing names the reason.
_SPECIFICITY = {Refusal.PERIOD: 0, Refusal.SCOPE: 1, Refusal.EXPIRED: 2, Refusal.NO_CONSENT: 3}
