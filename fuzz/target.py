"""The code under fuzz: the worker's own stages, called as the worker calls them.

`Fleet` is a registry in memory built from the spec's vector keys (so every run is
deterministic and needs no key generation); `PipelineTarget` runs one message through
`ingest.pipeline.check` (decode, verify: the worker's own composition) and `judge`
against a bounded in-memory store (`MemoryStore`) of the readings it accepted, so that
duplicates, reused seqs, register and rate rules are reachable too.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from meterproof.ingest.judge import RateLimit, StoredPoint, context_of, judge
from meterproof.ingest.pipeline import check
from meterproof.ingest.records import (
    Accepted,
    Candidate,
    Duplicate,
    Message,
    Outcome,
    Rejection,
)
from meterproof.ingest.security import event_for
from meterproof.ingest.store import storable_text
from meterproof.ingest.verify import TimeBounds
from meterproof.registry.snapshots import MeterSnapshot, RegisteredKey
from meterproof.schemas.reading import OPTIONAL_FIELDS, Alg
from meterproof.schemas.signatures import PrivateKey, load_private_key, load_public_key

VECTORS: Final = Path(__file__).resolve().parent.parent / "schemas" / "vectors"

#: docs/spec/reading-v1.md section 9, written out here rather than taken from `RejectReason`,
#: so that a code added to the enum but not to the spec is caught as an unknown reason.
SPEC_REASONS: Final = frozenset(
    {
        "malformed",
        "topic_mismatch",
        "unknown_meter",
        "meter_not_active",
        "unsupported_alg",
        "bad_signature",
        "timestamp_skew",
        "stale_reading",
        "seq_reused",
        "register_decreased",
        "rate_limited",
        "store_refused",
    }
)
#: Outcomes of rules 7-9 (the in-memory store decides them): any of these is right for a
#: reading that passes rules 1-6.
JUDGED: Final = frozenset(
    {"accepted", "duplicate", "seq_reused", "register_decreased", "rate_limited"}
)

Target = Callable[[Message], object]
_RSA: Final = (Alg.RS256, Alg.PS256)


@dataclass(frozen=True, slots=True)
class Signer:
    """A registered meter and one of its keys: what a generated reading is signed with."""

    meter_id: str
    kid: str
    alg: Alg
    key: PrivateKey
    slow: bool  # RSA: signing costs milliseconds, so generators draw from a pre-signed pool


@dataclass(slots=True)
class Fleet:
    now_ms: int
    meters: dict[str, MeterSnapshot]
    signers: list[Signer]  # active meters: readings that pass rules 3-5
    inactive: list[Signer]  # registered, status not accepting readings
    unregistered: Signer  # a key whose meter id the registry does not know
    vector_cases: list[tuple[str, bytes, frozenset[str] | None]] = field(default_factory=list)

    def algs_of(self, meter_id: str) -> set[Alg]:
        meter = self.meters.get(meter_id)
        return set() if meter is None else {k.key.alg for k in meter.keys}


def load_fleet() -> Fleet:
    """Vector meters with the vector keys; extra meters for inactive, maintenance and
    expired-key cases. Meter 123e... has only its EdDSA key, as rejections.json assumes."""
    signed: dict[str, Any] = json.loads((VECTORS / "signed-readings.json").read_text())
    rejections: dict[str, Any] = json.loads((VECTORS / "rejections.json").read_text())
    now_ms = int(signed["server_time_ms"])
    keys: list[tuple[str, Alg, PrivateKey]] = []
    for entry in signed["keys"]:
        alg = Alg(entry["alg"])
        kid = alg.value.lower() + (f"-{entry['rsa_bits']}" if entry["rsa_bits"] else "")
        keys.append((kid, alg, load_private_key(alg, entry["private_key_pem"].encode())))

    def registered(kid: str, key: PrivateKey, valid_to_ms: int | None = None) -> RegisteredKey:
        return RegisteredKey(kid, load_public_key(key.alg, key.public_key().pem()), 0, valid_to_ms)

    meters: dict[str, MeterSnapshot] = {}
    signers: list[Signer] = []
    only_eddsa = rejections["meter_id"]
    vector_ids = sorted({v["topic"].split("/")[1] for k in signed["keys"] for v in k["vectors"]})
    for meter_id in [*vector_ids, "fz-maintenance"]:
        mine = [k for k in keys if meter_id != only_eddsa or k[1] is Alg.EDDSA]
        status = "maintenance" if meter_id == "fz-maintenance" else "active"
        meters[meter_id] = MeterSnapshot(
            meter_id, status, tuple(registered(kid, key) for kid, _, key in mine)
        )
        signers += [Signer(meter_id, kid, alg, key, alg in _RSA) for kid, alg, key in mine]
    # One RSA key registered for both RS256 and PS256: padding confusion must still fail.
    _, _, rs_key = next(k for k in keys if k[1] is Alg.RS256)
    ps_view = load_private_key(Alg.PS256, rs_key.pem())
    meters["fz-rsa-both"] = MeterSnapshot(
        "fz-rsa-both", "active", (registered("rs", rs_key), registered("ps", ps_view))
    )
    signers += [
        Signer("fz-rsa-both", "rs", Alg.RS256, rs_key, True),
        Signer("fz-rsa-both", "ps", Alg.PS256, ps_view, True),
    ]
    ed_kid, _, ed_key = next(k for k in keys if k[1] is Alg.EDDSA)
    es_kid, _, es_key = next(k for k in keys if k[1] is Alg.ES256)
    inactive = []
    for status in ("quarantined", "inactive", "decommissioned"):
        meter_id = f"fz-{status}"
        meters[meter_id] = MeterSnapshot(meter_id, status, (registered(ed_kid, ed_key),))
        inactive.append(Signer(meter_id, ed_kid, Alg.EDDSA, ed_key, False))
    # Keys that expired before `now`: for every reading they are "no valid key" (rule 4).
    meters["fz-expired"] = MeterSnapshot(
        "fz-expired", "active", (registered(ed_kid, ed_key, 1), registered(es_kid, es_key, 1))
    )
    fleet = Fleet(
        now_ms,
        meters,
        signers,
        inactive,
        Signer("fz-unregistered", ed_kid, Alg.EDDSA, ed_key, False),
    )
    for entry in signed["keys"]:
        for v in entry["vectors"]:
            meter_id = v["topic"].split("/")[1]
            ok = Alg(entry["alg"]) in fleet.algs_of(meter_id)
            fleet.vector_cases.append(
                (
                    v["topic"],
                    v["payload"].encode(),
                    JUDGED if ok else frozenset({"unsupported_alg"}),
                )
            )
    for case in rejections["cases"]:
        fleet.vector_cases.append(
            (case["topic"], case["payload"].encode(), frozenset({case["reason"]}))
        )
    return fleet


#: What a signature covers besides `meter_id`, in a fixed order: two readings of a meter
#: with equal values here are the same reading (rule 7's `duplicate`).
SIGNED: Final = ("seq", "ts", "import_wh", "export_wh", *OPTIONAL_FIELDS)


def signed_values(fields: Mapping[str, object]) -> tuple[object, ...]:
    """The values of `SIGNED` in `fields` (None where an optional is left out)."""
    return tuple(fields.get(name) for name in SIGNED)


@dataclass(slots=True)
class MemoryStore:
    """The fuzzer's database: the accepted readings, at most `max_seen` seqs (then it
    starts empty again) and the last `history_len` points per meter, so memory is bounded
    by construction and any growth the fuzzer measures comes from the code under test.
    `values` is what the checker's own rules 7-9 read (`checker.judged`)."""

    max_seen: int = 20_000
    history_len: int = 64
    seen: dict[tuple[str, int], bytes] = field(default_factory=dict)
    values: dict[tuple[str, int], tuple[object, ...]] = field(default_factory=dict)
    history: dict[str, deque[StoredPoint]] = field(default_factory=dict)

    def add(self, candidate: Candidate) -> None:
        r = candidate.reading
        if len(self.seen) >= self.max_seen:
            self.seen.clear()
            self.values.clear()
            self.history.clear()
        self.seen[(r.meter_id, r.seq)] = candidate.reading_hash
        self.values[(r.meter_id, r.seq)] = signed_values(r.wire_dict())
        self.history.setdefault(r.meter_id, deque(maxlen=self.history_len)).append(
            StoredPoint(r.ts, r.import_wh, r.export_wh, r.seq)
        )


class PipelineTarget:
    """One message through the worker's stages, judged against `store` (rules 7-9), where
    an accepted reading is then stored."""

    def __init__(
        self,
        fleet: Fleet,
        *,
        bounds: TimeBounds | None = None,
        limit: RateLimit | None = None,
        store: MemoryStore | None = None,
    ) -> None:
        self._fleet = fleet
        self._bounds = bounds or TimeBounds()
        self.limit = limit or RateLimit()
        self.store = store or MemoryStore()

    def __call__(self, message: Message) -> Outcome:
        checked = check(message, self._fleet.meters, now_ms=self._fleet.now_ms, bounds=self._bounds)
        if isinstance(checked, Rejection):
            return checked
        store = self.store
        stored = context_of([checked], seen=store.seen, history=store.history, limit=self.limit)
        outcome = judge([checked], stored, limit=self.limit)[0]
        if isinstance(outcome, Accepted):
            store.add(outcome.candidate)
        return outcome


def label(outcome: object) -> str:
    """The outcome's name: `accepted`, `duplicate` or the rejection's reason code; raises
    `TypeError` for anything the worker could not acknowledge."""
    if isinstance(outcome, Accepted):
        return "accepted"
    if isinstance(outcome, Duplicate):
        return "duplicate"
    if isinstance(outcome, Rejection):
        return str(getattr(outcome.reason, "value", outcome.reason))
    raise TypeError(f"not an outcome: {type(outcome).__name__}")


def unstorable(outcome: object) -> str | None:
    """Why PostgreSQL would refuse the rows the store writes for this outcome, if it would.

    A refused COPY is a transient error to the worker: the batch is retried forever and
    every message behind it waits (a poison message). Text columns cannot hold NUL, jsonb
    cannot hold \\u0000, and psycopg cannot encode a lone surrogate.
    """
    texts: list[tuple[str, str | None]] = []
    if isinstance(outcome, Rejection):
        event = event_for(outcome)
        texts = [
            ("topic", storable_text(outcome.message.topic)),  # as the store writes it
            ("meter_id", outcome.meter_id),
            ("detail", outcome.detail),
            ("event", json.dumps(event.detail, ensure_ascii=False)),
        ]
    elif isinstance(outcome, Accepted):
        r = outcome.candidate.reading
        texts = [("meter_id", r.meter_id), ("alg", r.alg), ("kid", r.kid)]
    for column, text in texts:
        if text is None:
            continue
        if "\x00" in text:
            return f"{column} holds NUL: {text[:200]!r}"
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return f"{column} is not encodable as UTF-8: {text[:200]!r}"
    return None


def fleet_topics(fleet: Fleet) -> list[str]:
    """Topics an atheris input can pick with its first byte: the same list in both processes."""
    return sorted(
        {t for t, _, _ in fleet.vector_cases} | {f"meters/{m}/readings" for m in fleet.meters}
    )


def atheris_input(topics: list[str], data: bytes) -> tuple[str, bytes]:
    """An atheris input as the pipeline reads it: the first byte picks one of `topics`
    (`fleet_topics`), the rest is the payload."""
    return (topics[data[0] % len(topics)] if data else topics[0]), data[1:]
