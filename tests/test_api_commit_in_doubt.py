"""A provider batch whose COMMIT lost its answer: the API's store sends that COMMIT itself
(the ingest store writes on a savepoint of it), and the worker retries the batch on a new
connection of the same factory. Judged again, it found its own reading stored (`duplicate`,
so the provider was answered `nonce_reused` for a reading its request stored) and wrote
its rejections and their security events, which the quarantine counts, a second time."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import orjson
import psycopg
import pytest
from ingest_harness import CommitCutter
from nacl.signing import SigningKey
from test_api_provider import Provider

from meterproof.api.provider_store import provider_store
from meterproof.config import new_share_group
from meterproof.errors import UnavailableError
from meterproof.ingest.decode import Decoded, decode
from meterproof.ingest.records import Accepted, Candidate, Message, Outcome, Rejection
from meterproof.ingest.settings import IngestSettings
from meterproof.ingest.store import BatchResult
from meterproof.registry import providers
from meterproof.schemas import provider
from meterproof.schemas.reading import RejectReason
from meterproof.schemas.timestamps import wall_ms
from meterproof.stack.postgres import PostgresServer


def _register(database_url: str, meter: str) -> Provider:
    p = Provider(f"prov-{meter[-12:]}", meter)
    with psycopg.connect(database_url, autocommit=True) as conn:
        providers.register(conn, provider.ProviderRegistration(**p.registration()), by="test")
    return p


def _decoded(meter: str, body: dict[str, object]) -> Decoded:
    decoded = decode(Message(provider.topic(meter), orjson.dumps(body), wall_ms()))
    assert isinstance(decoded, Decoded)
    return decoded


def _candidate(meter: str, body: dict[str, object]) -> Candidate:
    """As the API's worker verifies it (the store does not check the signature again)."""
    d = _decoded(meter, body)
    return Candidate(d.message, d.reading, d.signing_bytes, d.reading_hash, wall_ms())


def _rejection(meter: str, body: dict[str, object], reason: RejectReason) -> Rejection:
    d = _decoded(meter, body)
    return Rejection(d.message, reason, "a test", meter, d.reading.seq, d.reading_hash)


def _written(database_url: str, meter: str) -> tuple[int, int, int, int]:
    """Rows of the meter's readings, kept bytes, rejected readings (the unattributed ones
    too: by topic) and security events (by the rejections' hashes)."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM readings WHERE meter_id = %(m)s),"
            " (SELECT count(*) FROM provider_readings WHERE meter_id = %(m)s),"
            " (SELECT count(*) FROM rejected_readings WHERE topic = %(t)s),"
            " (SELECT count(*) FROM security_events WHERE detail->>'reading_hash' IN ("
            "   SELECT encode(reading_hash, 'hex') FROM rejected_readings WHERE topic = %(t)s))",
            {"m": meter, "t": provider.topic(meter)},
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2]), int(row[3])


def _kinds(outcomes: Sequence[Outcome]) -> list[tuple[str, RejectReason | None]]:
    return [(type(o).__name__, o.reason if isinstance(o, Rejection) else None) for o in outcomes]


@pytest.mark.parametrize(
    ("deliver", "fresh"),
    [(True, True), (True, False), (False, True)],
    ids=["committed", "committed-nothing-accepted", "not-committed"],
)
def test_a_provider_batch_whose_commit_answer_was_lost_is_not_judged_again(
    postgres: PostgresServer, database_url: str, meter_id: str, deliver: bool, fresh: bool
) -> None:
    """The batch: a provider reading (accepted; or, below a stored nonce, refused
    `seq_reused` by this store), a forged one (unattributed: no meter id) and a replayed
    one. A COMMIT that never reached the server is written by the retry, once."""
    p = _register(database_url, meter_id)
    nonce = 10 if fresh else 1
    candidates = [_candidate(meter_id, p.reading(5, nonce))]
    rejections = [
        _rejection(
            meter_id, p.reading(6, 90, key=SigningKey.generate()), RejectReason.BAD_SIGNATURE
        ),
        _rejection(meter_id, p.reading(7, 91), RejectReason.SEQ_REUSED),
    ]
    settings = IngestSettings(database_url=database_url, share_group=new_share_group())
    if not fresh:  # a higher nonce stored first
        store = provider_store(settings)()
        try:
            store.commit_batch([_candidate(meter_id, p.reading(4, 5))], [])
        finally:
            store.close()
    before = _written(database_url, meter_id)
    cutter = CommitCutter(
        postgres.port, lambda: _written(database_url, meter_id) != before, deliver=deliver
    )

    async def scenario() -> BatchResult:
        async with cutter.serving(database_url) as via_proxy:
            factory = provider_store(settings.model_copy(update={"database_url": via_proxy}))
            first = await asyncio.to_thread(factory)
            cutter.armed = True
            with pytest.raises(UnavailableError):
                await asyncio.to_thread(first.commit_batch, candidates, rejections)
            first.close()
            second = await asyncio.to_thread(factory)  # the worker's retry
            try:
                return await asyncio.to_thread(second.commit_batch, candidates, rejections)
            finally:
                second.close()

    result = asyncio.run(scenario())
    outcome = ("Accepted", None) if fresh else ("Rejection", RejectReason.SEQ_REUSED)
    readings, kept, rejected, events = before
    assert (cutter.cuts, _kinds(result.outcomes), result.quarantined) == (1, [outcome], [])
    assert _written(database_url, meter_id) == (
        readings + fresh,
        kept + fresh,
        rejected + 2 + (not fresh),
        events + 2 + (not fresh),
    )
    if fresh:
        assert isinstance(result.outcomes[0], Accepted)
        assert result.outcomes[0].candidate is candidates[0]
