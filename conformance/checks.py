"""The verdicts, one pure function per check over an `Observation`.

Each check names the section of docs/spec/reading-v1.md it holds the meter to, passes
or fails with one reason per finding (at most `MAX_REASONS` shown), or is skipped when
the run did not produce what it needs (a capture has no session; a phase was left out).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal

from meterproof.conformance.observations import Observation, Published, Subscribed, Window
from meterproof.registry.model import default_kid
from meterproof.schemas import topics
from meterproof.schemas.codec import MalformedPayload, decode_reading
from meterproof.schemas.reading import MAX_AGE_MS, MAX_FUTURE_MS, SignedReading, b64url_decode
from meterproof.schemas.signing import reading_hash, signing_bytes

Status = Literal["pass", "fail", "skip"]

MAX_REASONS: Final = 5
#: A receipt takes this long to reach the meter and stop a republish already under way.
RECEIPT_GRACE_S: Final = 2.0
#: Copies of one reading closer than this are a republish storm, not a timer.
MIN_REPUBLISH_GAP_S: Final = 1.0
#: Reconnect attempts closer than this are a tight loop.
MIN_RETRY_GAP_S: Final = 0.2
KEEPALIVE_RANGE_S: Final = (5, 300)


@dataclass(frozen=True, slots=True)
class Verdict:
    check: str
    status: Status
    summary: str
    reasons: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.status == "pass"


@dataclass(slots=True)
class _Findings:
    """Reasons gathered while a check runs; only the first few are kept, all counted."""

    reasons: list[str] = field(default_factory=list)
    count: int = 0

    def add(self, reason: str) -> None:
        self.count += 1
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(reason)

    def verdict(self, check: str, summary: str) -> Verdict:
        if not self.count:
            return Verdict(check, "pass", summary)
        more = self.count - len(self.reasons)
        extra = (f"... and {more} more",) if more else ()
        return Verdict(check, "fail", summary, (*self.reasons, *extra))


@dataclass(frozen=True, slots=True)
class _Parsed:
    published: Published
    reading: SignedReading
    digest: str


def _parsed(obs: Observation) -> list[_Parsed]:
    out = []
    for p in obs.published:
        try:
            reading = decode_reading(p.payload)
        except MalformedPayload:
            continue
        out.append(_Parsed(p, reading, reading_hash(signing_bytes(reading)).hex()))
    return out


def _distinct(parsed: list[_Parsed]) -> list[_Parsed]:
    """First arrival of each distinct payload, in arrival order."""
    seen: set[bytes] = set()
    out = []
    for p in parsed:
        if p.published.payload not in seen:
            seen.add(p.published.payload)
            out.append(p)
    return out


def _label(p: Published, index: int) -> str:
    return f"payload {index} at {p.at_s:.1f} s" if p.wall_ms is not None else f"payload {index}"


def strict_json(obs: Observation) -> Verdict:
    """Section 5: every payload is one strict reading-v1 object."""
    findings = _Findings()
    for i, p in enumerate(obs.published):
        try:
            decode_reading(p.payload)
        except MalformedPayload as exc:
            findings.add(f"{_label(p, i)}: malformed: {exc}")
    if not obs.published:
        return Verdict("strict_json", "fail", "no payloads", ("the meter sent nothing",))
    return findings.verdict("strict_json", f"{len(obs.published)} payloads")


def key_binding(obs: Observation) -> Verdict:
    """Sections 1, 2, 7: `alg` is the key's, `kid` (if sent) names it, `meter_id` is the
    meter's own and its topic's."""
    findings = _Findings()
    kid = default_kid(obs.key.pem())
    parsed = _distinct(_parsed(obs))
    for p in parsed:
        r = p.reading
        where = f"seq {r.seq}"
        if r.alg != obs.key.alg.value:
            findings.add(f"{where}: alg {r.alg!r} but the key is registered for {obs.key.alg}")
        if r.kid is not None and r.kid != kid:
            findings.add(f"{where}: kid {r.kid!r} does not name the key (its kid is {kid})")
        if obs.meter_id is not None and r.meter_id != obs.meter_id:
            findings.add(f"{where}: meter_id {r.meter_id!r}, the meter is {obs.meter_id!r}")
        if p.published.topic and p.published.topic != topics.readings(r.meter_id):
            findings.add(f"{where}: published on {p.published.topic!r} (topic_mismatch)")
    if not parsed:
        return Verdict("key_binding", "skip", "no parsable payload")
    return findings.verdict("key_binding", f"{len(parsed)} readings, key {obs.key.alg}")


def signature(obs: Observation) -> Verdict:
    """Section 6: the signature verifies over the signing bytes (not the JSON text)."""
    findings = _Findings()
    checked = 0
    for p in _distinct(_parsed(obs)):
        if p.reading.alg != obs.key.alg.value:
            continue  # key_binding names it; verifying with another algorithm means nothing
        checked += 1
        if not obs.key.verify(b64url_decode(p.reading.sig), signing_bytes(p.reading)):
            findings.add(
                f"seq {p.reading.seq}: signature does not verify over the signing bytes "
                f"(bad_signature; `conformance explain` shows the expected bytes)"
            )
    if not checked:
        return Verdict("signing_bytes", "skip", "no parsable payload with the key's alg")
    return findings.verdict("signing_bytes", f"{checked} signatures")


def seq_and_ts(obs: Observation) -> Verdict:
    """Sections 4, 9, 11: seq never reused for other values, ts plausible, and in seq order
    neither ts nor the registers go back. Arrival order is not judged: a reading whose
    first copy was lost (an outage, a power cut) comes again from the outbox after later
    ones, as section 11 asks."""
    findings = _Findings()
    by_seq: dict[int, _Parsed] = {}
    for p in _distinct(_parsed(obs)):
        r = p.reading
        known = by_seq.get(r.seq)
        if known is not None:
            if known.digest != p.digest:
                findings.add(f"seq {r.seq} used again for other values (seq_reused)")
            continue  # the same reading again: a republish, judged elsewhere
        by_seq[r.seq] = p
        wall = p.published.wall_ms
        if wall is not None and r.ts > wall + MAX_FUTURE_MS:
            findings.add(f"seq {r.seq}: ts {r.ts - wall} ms ahead of the clock (timestamp_skew)")
        if wall is not None and r.ts < wall - MAX_AGE_MS:
            findings.add(f"seq {r.seq}: ts {wall - r.ts} ms old (stale_reading)")
    previous: SignedReading | None = None
    for seq in sorted(by_seq):
        r = by_seq[seq].reading
        if previous is not None:
            if r.ts < previous.ts:
                findings.add(f"seq {r.seq}: ts {r.ts} before seq {previous.seq}'s {previous.ts}")
            elif r.import_wh < previous.import_wh or r.export_wh < previous.export_wh:
                findings.add(
                    f"seq {r.seq}: registers ({r.import_wh}, {r.export_wh}) below seq "
                    f"{previous.seq}'s ({previous.import_wh}, {previous.export_wh}) "
                    "(register_decreased)"
                )
        previous = r
    if not by_seq:
        return Verdict("seq_ts", "skip", "no parsable payload")
    return findings.verdict("seq_ts", f"{len(by_seq)} distinct readings")


def receipt_handling(obs: Observation) -> Verdict:
    """Sections 3, 10: subscribed to its receipts at QoS 1 after every connect, and a
    receipted reading is never published again."""
    if not obs.live:
        return Verdict("receipt_handling", "skip", "needs a live meter")
    findings = _Findings()
    own = topics.receipts(obs.meter_id or "")
    subscribed = [s for s in obs.subscribes if s.topic == own]
    if not subscribed:
        findings.add(f"never subscribed to {own}")
    elif min(s.qos for s in subscribed) < 1:
        findings.add(f"subscribed to {own} at QoS {min(s.qos for s in subscribed)}, not 1")
    else:
        _subscribed_after_each_connect(obs, subscribed, findings)
    # From its first receipt on (the worker answers each later copy too, `duplicate`, so
    # a copy is always followed by a receipt of its own), or from when the meter could
    # first hear it, if the kit had it away from the broker then.
    offline = _offline(obs)
    receipted: dict[tuple[int, str | None], float] = {}
    for r in obs.receipts:
        if r.seq is not None:
            named, heard = (r.seq, r.reading_hash), _heard(r.at_s, offline)
            receipted[named] = min(heard, receipted.get(named, heard))
    for p in _parsed(obs):
        sent = receipted.get((p.reading.seq, p.digest))
        if sent is not None and p.published.at_s > sent + RECEIPT_GRACE_S:
            findings.add(
                f"seq {p.reading.seq} published again {p.published.at_s - sent:.1f} s after "
                "its receipt"
            )
    if not receipted and not findings.count:
        return Verdict("receipt_handling", "skip", "no receipt named a reading (none parsed)")
    return findings.verdict("receipt_handling", f"{len(receipted)} receipts sent")


def _offline(obs: Observation) -> list[Window]:
    """When the kit kept the meter from the broker: from the outage's start, and from the
    power cut, until the meter's first connect after each."""
    away = []
    if obs.outage is not None:
        away.append((obs.outage.start_s, obs.outage.end_s))
    if obs.power_cut is not None:
        away.append((obs.power_cut.end_s, obs.power_cut.end_s))
    return [
        Window(start, min((c.at_s for c in obs.connects if c.at_s > back), default=math.inf))
        for start, back in away
    ]


def _heard(at_s: float, offline: list[Window]) -> float:
    """When a receipt sent at `at_s` could reach the meter: at once, or on its return."""
    return next((w.end_s for w in offline if at_s in w), at_s)


def _subscribed_after_each_connect(
    obs: Observation, subscribed: list[Subscribed], findings: _Findings
) -> None:
    """Section 3: the receipts subscription is made again after every connect, since a
    broker that lost the session lost the subscription too. The log's records carry the
    time the kit read them, so one read early can share its connect's time."""
    starts = sorted(c.at_s for c in obs.connects)
    for start, end in zip(starts, [*starts[1:], math.inf], strict=True):
        if not any(start <= s.at_s <= end for s in subscribed):
            findings.add(f"connect at {start:.1f} s: did not subscribe to its receipts again")


def republish(obs: Observation) -> Verdict:
    """Section 11: while receipts are withheld, the same bytes are published again, on a
    timer rather than in a storm."""
    if obs.silence is None:
        return Verdict("republish", "skip", "the silence phase did not run")
    findings = _Findings()
    first: dict[tuple[int, str], bytes] = {}
    copies: dict[bytes, list[float]] = {}
    for p in _parsed(obs):
        key = (p.reading.seq, p.digest)  # other values under one seq are seq_ts's finding
        if first.setdefault(key, p.published.payload) != p.published.payload:
            findings.add(f"seq {p.reading.seq} sent again signed anew, not byte for byte")
    for published in obs.published:  # malformed payloads too: republishing is about bytes
        copies.setdefault(published.payload, []).append(published.at_s)
    again = 0
    for times in copies.values():
        in_silence = [t for t in times if t in obs.silence]
        if len(times) > 1 and any(t in obs.silence for t in times[1:]):
            again += 1
        gaps = [b - a for a, b in itertools.pairwise(in_silence)]
        if gaps and min(gaps) < MIN_REPUBLISH_GAP_S:
            findings.add(f"one reading republished {min(gaps):.2f} s after its last copy")
    seconds = obs.silence.end_s - obs.silence.start_s
    if not again:
        findings.add(f"no unreceipted reading was published again during {seconds:.0f} s")
    return findings.verdict(
        "republish", f"{again} readings republished in {seconds:.0f} s without receipts"
    )


def power_cut(obs: Observation) -> Verdict:
    """Section 11: a meter that loses power keeps its outbox and its seq. What it had
    published without a receipt when the power went comes again, byte for byte, after it
    starts; its first new reading goes on above every seq it used before."""
    cut = obs.power_cut
    if cut is None:
        return Verdict("power_cut", "skip", "the power-cut phase did not run")
    parsed = _parsed(obs)
    if not parsed:
        return Verdict("power_cut", "skip", "no parsable payload")
    findings = _Findings()
    receipted = {(r.seq, r.reading_hash) for r in obs.receipts if r.at_s <= cut.end_s}
    before = [p for p in parsed if p.published.at_s <= cut.end_s]
    after = [p for p in parsed if p.published.at_s > cut.end_s]
    after_bytes = {p.published.payload for p in after}
    digests: dict[int, set[str]] = {}
    for p in parsed:
        digests.setdefault(p.reading.seq, set()).add(p.digest)
    owed = {  # a seq used for other values too is seq_ts's finding, not this one's
        (p.reading.seq, p.digest): p.published.payload
        for p in before
        if p.published.at_s >= cut.start_s
        and (p.reading.seq, p.digest) not in receipted
        and len(digests[p.reading.seq]) == 1
    }
    lost = sorted(seq for (seq, _), payload in owed.items() if payload not in after_bytes)
    if lost:
        findings.add(f"unreceipted before the cut, not sent again after it: seq {lost[:8]}")
    if not owed:
        findings.add("no unreceipted reading when the power went: nothing could be judged")
    top = max((p.reading.seq for p in before), default=0)
    known = {(p.reading.seq, p.digest) for p in before}
    fresh = [p.reading.seq for p in after if (p.reading.seq, p.digest) not in known]
    if not after:
        findings.add("no reading after the restart")
    elif fresh and min(fresh) <= top:
        findings.add(f"after the restart seq {min(fresh)} follows seq {top}: the counter was lost")
    return findings.verdict(
        "power_cut", f"{len(owed)} unreceipted at the cut, {len(after)} readings after it"
    )


def reconnect_backoff(obs: Observation) -> Verdict:
    """Section 12: retries spaced out and growing while the broker is away, then back."""
    if obs.outage is None:
        return Verdict("reconnect_backoff", "skip", "the outage phase did not run")
    findings = _Findings()
    attempts = sorted(obs.attempts)
    seconds = obs.outage.end_s - obs.outage.start_s
    times = [obs.outage.start_s, *attempts]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    if gaps and min(gaps) < MIN_RETRY_GAP_S:
        findings.add(
            f"{len(attempts)} attempts in {seconds:.0f} s, {min(gaps) * 1000:.0f} ms apart "
            "at the closest: a tight loop"
        )
    elif len(gaps) >= 4:
        half = len(gaps) // 2
        early, late = sum(gaps[:half]) / half, sum(gaps[-half:]) / half
        if late < 1.5 * early:
            findings.add(
                f"retries do not back off: {early:.2f} s apart at first, {late:.2f} s later"
            )
    if not attempts:
        findings.add(f"no connection attempt during the {seconds:.0f} s outage")
    if not any(c.at_s > obs.outage.end_s for c in obs.connects):
        findings.add(f"not reconnected {obs.reconnect_wait_s:.0f} s after the broker returned")
    return findings.verdict(
        "reconnect_backoff",
        f"{len(attempts)} attempts in {seconds:.0f} s"
        + (f", gaps {', '.join(f'{g:.2f}' for g in gaps[:8])} s" if gaps else ""),
    )


def session(obs: Observation) -> Verdict:
    """Section 3: MQTT 3.1.1 or 5, clean start off on every connect, a keepalive in
    range, readings at QoS 1 and not retained."""
    if not obs.live:
        return Verdict("session", "skip", "needs a live meter")
    findings = _Findings()
    for c in obs.connects:
        when = f"connect at {c.at_s:.1f} s"
        if c.clean_start:
            findings.add(f"{when}: clean start on (receipts sent meanwhile are lost)")
        if c.protocol not in ("3.1.1", "5"):
            findings.add(f"{when}: MQTT {c.protocol}")
        low, high = KEEPALIVE_RANGE_S
        if not low <= c.keepalive_s <= high:
            findings.add(f"{when}: keepalive {c.keepalive_s} s, not {low}..{high}")
    for p in obs.published:
        if p.qos != 1:
            findings.add(f"a reading at {p.at_s:.1f} s published at QoS {p.qos}")
        if p.retain:
            findings.add(f"a reading at {p.at_s:.1f} s published retained")
    if not obs.connects:
        findings.add("the broker logged no connection of the meter")
    versions = sorted({c.protocol for c in obs.connects})
    return findings.verdict(
        "session", f"{len(obs.connects)} connects, MQTT {'/'.join(versions) or '-'}"
    )


#: What a capture of payloads can show.
PAYLOAD_CHECKS: Final[tuple[Callable[[Observation], Verdict], ...]] = (
    signature,
    strict_json,
    key_binding,
    seq_and_ts,
)
#: A live meter also shows how it behaves.
LIVE_CHECKS: Final[tuple[Callable[[Observation], Verdict], ...]] = (
    *PAYLOAD_CHECKS,
    receipt_handling,
    republish,
    reconnect_backoff,
    power_cut,
    session,
)


def run_checks(obs: Observation) -> list[Verdict]:
    return [check(obs) for check in (LIVE_CHECKS if obs.live else PAYLOAD_CHECKS)]
