"""The API worker's store: the ingest `ReadingStore`, unchanged, inside a transaction that
also applies seed 003's nonce rule and keeps provider readings' signed bytes.

`ReadingStore.commit_batch` runs its own transaction; opened inside this one it becomes a
savepoint (psycopg nests them), so rules 7-9, the rows, the quarantines and what is added
here commit together or not at all. Batches without provider readings go straight to it.
Its poison-batch guard parks what the database refuses of its rows inside that savepoint;
what it refuses of the rows added here (the kept bytes) gets the same guard here, so one
refused reading is answered `store_refused` and never holds up the API's worker.

Seed 003 asks a provider's nonce to be unused *and increasing*. Unused is rule 7 (the
nonce is the reading's seq: the judge answers `duplicate` for the same signed reading and
`seq_reused` for another); increasing is not a reading-v1 rule (a meter's outbox may
deliver an old seq late), so it is checked here, under the same meter locks, before the
judge: a provider nonce at or below the meter's highest stored seq, not itself stored,
is refused `seq_reused` and recorded like every refusal.

Anyone can post a body naming a provider's meter: unlike a meter's own topic (broker ACL)
or its certificate (the API), nothing proves who sent a provider reading until its
signature verifies. So refusals decided before that (`UNATTRIBUTED`) are stored without
the meter id (the topic still names it): they raise no security event on the meter and
never count towards its quarantine, which a stranger could otherwise trigger at will.

This store sends the COMMIT of a provider batch, so it keeps a batch whose COMMIT lost its
answer with its connection in the inner store's `CommitInDoubt` (shared by the worker's
connections), and asks it first when the worker retries: judged again, the batch found
its own readings stored (`duplicate`: a provider answered 422 `nonce_reused`,
`same_reading`, for the reading its own request stored) and wrote its rejections and their
security events a second time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Final

import psycopg
import structlog
from psycopg import Connection

from meterproof.errors import UnavailableError, first_line
from meterproof.ingest.records import Accepted, Candidate, Rejection
from meterproof.ingest.settings import IngestSettings
from meterproof.ingest.store import BatchResult, PoisonGuard, ReadingStore, refused
from meterproof.ingest.worker import StoreFactory, postgres_store
from meterproof.schemas import provider
from meterproof.schemas.reading import RejectReason, b64url_decode

log = structlog.get_logger("api.provider_store")

#: The highest seq each meter has stored, retired ones (retention's watermark) included.
_HIGHEST: Final = """
SELECT u.meter_id, greatest(
    (SELECT max(r.seq) FROM reading_log r WHERE r.meter_id = u.meter_id),
    (SELECT w.max_seq FROM reading_watermarks w WHERE w.meter_id = u.meter_id))
FROM unnest(%s::text[]) AS u(meter_id)
"""
#: Only for a (provider, meter) pair the providers table holds: a key someone added to a
#: meter under a provider-like kid has no provider to keep bytes for (logged).
_KEEP: Final = """
INSERT INTO provider_readings (meter_id, seq, reading_hash, provider_id, signed_bytes, signature)
SELECT u.meter_id, u.seq, u.reading_hash, u.provider_id, u.signed_bytes, u.signature
FROM unnest(%s::text[], %s::numeric[], %s::bytea[], %s::text[], %s::bytea[], %s::bytea[])
    AS u(meter_id, seq, reading_hash, provider_id, signed_bytes, signature)
JOIN providers p ON p.provider_id = u.provider_id AND p.meter_id = u.meter_id
"""


#: Refusals of a provider reading that do not show its provider sent it.
UNATTRIBUTED: Final = frozenset({
    RejectReason.MALFORMED, RejectReason.TOPIC_MISMATCH, RejectReason.UNKNOWN_METER,
    RejectReason.METER_NOT_ACTIVE, RejectReason.UNSUPPORTED_ALG, RejectReason.BAD_SIGNATURE,
})  # fmt: skip


def is_provider(item: Candidate | Rejection) -> bool:
    return provider.meter_of_topic(item.message.topic) is not None


def _unattributed(rejection: Rejection) -> Rejection:
    if rejection.reason in UNATTRIBUTED and is_provider(rejection):
        return dataclasses.replace(rejection, meter_id=None)
    return rejection


class ProviderStore:
    """A `BatchStore` around `ReadingStore`, on the same connection."""

    def __init__(self, conn: Connection[tuple[object, ...]], inner: ReadingStore) -> None:
        self._conn = conn
        self._inner = inner
        #: What the COMMIT in flight commits (`commit_batch`); None before it is sent.
        self._committing: BatchResult | None = None

    def close(self) -> None:
        self._inner.close()

    def abort(self) -> None:
        self._inner.abort()

    def commit_batch(
        self, candidates: Sequence[Candidate], rejections: Sequence[Rejection]
    ) -> BatchResult:
        rejections = [_unattributed(j) for j in rejections]
        if not any(is_provider(c) for c in candidates):
            return self._inner.commit_batch(candidates, rejections)
        stored = self._inner.landed(candidates, rejections)
        if stored is not None:
            return stored
        self._committing = None
        try:
            return self._commit(candidates, rejections)
        except psycopg.Error as exc:
            if self._committing is not None and self._conn.broken:
                self._inner.commit_lost(candidates, rejections, self._committing)
            raise UnavailableError("database", f"{type(exc).__name__}: {exc}") from exc

    def _commit(
        self, candidates: Sequence[Candidate], rejections: Sequence[Rejection]
    ) -> BatchResult:
        """One transaction. The inner store parks what the database refuses of its own
        rows; if it refuses what this store adds (the kept bytes), the store's poison-batch
        guard runs over this store's writes: a second transaction bisects the batch on
        savepoints, parks each refused reading `store_refused` and commits the rest."""
        try:
            with self._conn.transaction():
                self._committing = result = self._write(candidates, rejections)
            return result
        except psycopg.Error as exc:
            if not refused(exc):
                raise
            refusal = exc
        self._committing = None  # refused: not committed
        guard = PoisonGuard(self._conn, self._write, self._park, self._inner.stored_contexts)
        with self._conn.transaction():
            self._committing = result = guard.rescue(candidates, rejections, refusal)
        return result

    def _write(
        self, candidates: Sequence[Candidate], rejections: Sequence[Rejection]
    ) -> BatchResult:
        """The batch inside the caller's transaction: nonces, the inner store, the bytes."""
        stale = self._not_increasing(candidates)
        result = self._inner.commit_batch(
            [c for c in candidates if id(c) not in stale], [*rejections, *stale.values()]
        )
        self._keep(
            [o.candidate for o in result.outcomes
             if isinstance(o, Accepted) and is_provider(o.candidate)]
        )  # fmt: skip
        return BatchResult([*result.outcomes, *stale.values()], result.quarantined)

    def _park(self, item: Candidate | Rejection, exc: psycopg.Error) -> BatchResult:
        """Store a refused candidate as the inner store parks one: a rejection
        `store_refused` with the database's message, which is also its outcome. A
        rejection alone is not refused by what this store adds: the inner store parks
        its own rows, so the refusal stands."""
        if isinstance(item, Rejection):
            raise exc
        r = item.reading
        parked = Rejection(
            item.message, RejectReason.STORE_REFUSED,
            f"SQLSTATE {exc.sqlstate}: {first_line(exc)}", r.meter_id, r.seq, item.reading_hash,
        )  # fmt: skip
        self._inner.commit_batch([], [parked])
        log.error(
            "reading_parked",
            meter_id=r.meter_id,
            seq=r.seq,
            reading_hash=item.reading_hash.hex(),
            sqlstate=exc.sqlstate,
            error=first_line(exc),
        )
        return BatchResult([parked], [])

    def _not_increasing(self, candidates: Sequence[Candidate]) -> dict[int, Rejection]:
        """Provider candidates whose nonce is not above their meter's highest, by id.
        Every candidate's meter is locked first, in the store's own order (its
        `stored_contexts`), so no other worker's transaction can interleave."""
        contexts = self._inner.stored_contexts(candidates)
        meters = sorted({c.reading.meter_id for c in candidates if is_provider(c)})
        with self._conn.cursor() as cur:
            cur.execute(_HIGHEST, (meters,))
            highest: dict[str, int | None] = {
                str(m): None if h is None else int(h)  # type: ignore[call-overload]
                for m, h in cur.fetchall()
            }
        in_batch: set[tuple[str, int]] = set()
        stale: dict[int, Rejection] = {}
        for c, context in zip(candidates, contexts, strict=True):
            r = c.reading
            if not is_provider(c) or context.reading_hash is not None:
                continue  # rule 7 decides: duplicate or seq_reused
            last = highest.get(r.meter_id)
            if last is not None and r.seq <= last and (r.meter_id, r.seq) not in in_batch:
                stale[id(c)] = Rejection(
                    c.message, RejectReason.SEQ_REUSED,
                    f"nonce {r.seq} is not above the provider's last nonce {last}",
                    r.meter_id, r.seq, c.reading_hash,
                )  # fmt: skip
                continue
            in_batch.add((r.meter_id, r.seq))
            highest[r.meter_id] = r.seq if last is None else max(last, r.seq)
        return stale

    def _keep(self, accepted: Sequence[Candidate]) -> None:
        if not accepted:
            return
        rows = [
            [c.reading.meter_id for c in accepted],
            [c.reading.seq for c in accepted],
            [c.reading_hash for c in accepted],
            [c.reading.kid for c in accepted],
            [c.signing_bytes for c in accepted],
            [b64url_decode(c.reading.sig) for c in accepted],
        ]
        with self._conn.cursor() as cur:
            cur.execute(_KEEP, rows)
            if cur.rowcount != len(accepted):
                log.error("provider_bytes_not_kept", accepted=len(accepted), kept=cur.rowcount)


def provider_store(settings: IngestSettings) -> StoreFactory:
    """The API worker's store factory: `worker.postgres_store`'s, wrapped."""
    return postgres_store(settings, wrap=ProviderStore)
