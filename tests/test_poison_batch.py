"""The poison-batch guard (ingest/store.py): a reading the real database refuses is parked
as `store_refused` and the rest of its batch commits; an error a retry may fix is still
`UnavailableError`, with nothing stored. The refusals come from a CHECK constraint and a
trigger added to this test's own database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import orjson
import psycopg
import pytest
from ingest_harness import ProbeMeter, provision, running_worker, stored_counts, worker_settings
from test_ingest_store import candidate

from meterproof.certs.layout import PkiLayout
from meterproof.errors import UnavailableError
from meterproof.ingest import telemetry
from meterproof.ingest.judge import RateLimit
from meterproof.ingest.publish import receipt
from meterproof.ingest.records import Accepted, Candidate, Duplicate, Message, Rejection
from meterproof.ingest.security import QuarantinePolicy
from meterproof.ingest.store import BatchResult, ReadingStore
from meterproof.registry import repository
from meterproof.registry.model import NewKey, NewMeter
from meterproof.schemas.reading import RejectReason
from meterproof.schemas.signatures import generate_private_key
from meterproof.stack.broker import BrokerServer
from meterproof.stack.redis import RedisServer

T0 = 1_767_225_600_000
KEY = generate_private_key("EdDSA")
#: 666 Wh exported is refused by a CHECK on reading_log; seq 13 by a trigger on readings.
REFUSE = """
ALTER TABLE reading_log ADD CONSTRAINT no_666 CHECK (export_wh <> 666) NOT VALID;
CREATE FUNCTION refuse_13() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.seq = 13 THEN RAISE EXCEPTION 'seq 13 is refused here'; END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_13 BEFORE INSERT ON readings FOR EACH ROW EXECUTE FUNCTION refuse_13();
"""


def setup(database_url: str, meters: Sequence[str], extra_sql: str = REFUSE) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        pem = KEY.public_key().pem()
        repository.register(conn, [NewMeter(m, NewKey.parse("EdDSA", pem)) for m in meters])
        conn.execute(extra_sql)


def commit(
    database_url: str, candidates: Sequence[Candidate], rejections: Sequence[Rejection] = ()
) -> BatchResult:
    """One batch through a store of its own."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        store = ReadingStore(conn, limit=RateLimit(60_000, 1000), policy=QuarantinePolicy())
        return store.commit_batch(candidates, rejections)


def test_refused_readings_are_parked_and_the_rest_of_the_batch_commits(
    database_url: str, make_meter_id: Callable[[], str]
) -> None:
    a, b = make_meter_id(), make_meter_id()
    setup(database_url, [a, b])
    batch = [candidate(KEY, m, s, T0 + s * 1000, 100 + s, s) for m in (a, b) for s in range(1, 9)]
    batch[3] = candidate(KEY, a, 4, T0 + 4000, 104, 666)  # refused by the CHECK
    batch += [
        candidate(KEY, b, 13, T0 + 13_000, 200, 13),  # refused by the trigger
        batch[0],  # a copy of a reading stored in this very batch
        candidate(KEY, a, 2, T0 + 2000, 999, 2),  # seq_reused, judged in another half
    ]
    malformed = Rejection(Message(f"meters/{a}/readings", b"{", T0), RejectReason.MALFORMED, "x")
    result = commit(database_url, batch, [malformed])

    kinds = [type(o).__name__ for o in result.outcomes]
    assert kinds.count("Accepted") == 15
    parked = [o for o in result.outcomes if isinstance(o, Rejection)]
    assert [(o.meter_id, o.seq, o.reason) for o in parked] == [
        (a, 4, RejectReason.STORE_REFUSED),
        (b, 13, RejectReason.STORE_REFUSED),
        (a, 2, RejectReason.SEQ_REUSED),
    ]
    assert parked[0].detail.startswith("SQLSTATE 23514: ")
    assert "no_666" in parked[0].detail
    assert parked[1].detail == "SQLSTATE P0001: seq 13 is refused here"
    assert [type(o) for o in result.outcomes].count(Duplicate) == 1
    # the receipt a parked reading gets: final, and not "accepted"
    topic, body = receipt(parked[0]) or ("", b"")
    assert topic == f"meters/{a}/receipts"
    assert orjson.loads(body) == {
        "seq": 4,
        "reading_hash": batch[3].reading_hash.hex(),
        "status": "rejected",
        "reason": "store_refused",
    }
    counts = stored_counts(database_url, [a, b])
    assert sorted(counts) == sorted(
        [(a, s) for s in range(1, 9) if s != 4] + [(b, s) for s in range(1, 9)]
    )
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT meter_id, seq, reason, reading_hash FROM rejected_readings ORDER BY id"
        ).fetchall()
        events = conn.execute(
            "SELECT type, meter_id FROM security_events ORDER BY id"
        ).fetchall()  # fmt: skip
        rolled = conn.execute(
            "SELECT sum(readings) FROM meter_rollups WHERE width = '1d'"
        ).fetchone()  # fmt: skip
    assert sorted((r[0], r[1], r[2]) for r in rows if r[0] is not None) == sorted(
        [(a, 2, "seq_reused"), (a, 4, "store_refused"), (b, 13, "store_refused")]
    )
    assert [(r[0], r[1], r[2]) for r in rows if r[0] is None] == [(None, None, "malformed")]
    assert ("store_refused", a) in events
    assert ("store_refused", b) in events
    assert rolled == (15,)  # parked readings are in no rollup


def test_a_refused_rejection_is_parked_and_keeps_its_own_outcome(
    database_url: str, meter_id: str
) -> None:
    """The rows of a rejection can be refused too (here: its security event)."""
    setup(
        database_url,
        [meter_id],
        "ALTER TABLE security_events ADD CONSTRAINT no_x CHECK (detail->>'detail' <> 'x')"
        " NOT VALID",
    )
    bad = Rejection(
        Message(f"meters/{meter_id}/readings", b"{", T0), RejectReason.MALFORMED, "x", meter_id
    )
    good = candidate(KEY, meter_id, 1, T0, 1, 1)
    result = commit(database_url, [good], [bad])
    assert [type(o) for o in result.outcomes] == [Accepted]
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT reason, detail, payload FROM rejected_readings").fetchall()
    assert len(rows) == 1
    reason, detail, payload = rows[0]
    assert (reason, bytes(payload)) == ("store_refused", b"{")
    assert detail.startswith("malformed; SQLSTATE 23514")


@pytest.mark.parametrize(
    ("errcode", "why"),
    [("42501", "a privilege, the deployment is at fault"), ("40001", "a serialization failure")],
)
def test_errors_a_retry_may_fix_store_nothing_and_park_nothing(
    database_url: str, meter_id: str, errcode: str, why: str
) -> None:
    setup(
        database_url,
        [meter_id],
        f"""CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION '{why}' USING ERRCODE = '{errcode}'; END $$;
        CREATE TRIGGER refuse BEFORE INSERT ON readings FOR EACH ROW EXECUTE FUNCTION refuse();""",
    )
    with pytest.raises(UnavailableError, match=why) as raised:
        commit(database_url, [candidate(KEY, meter_id, s, T0 + s, s, s) for s in (1, 2, 3)])
    assert raised.value.dependency == "database"
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM reading_log").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM rejected_readings").fetchone() == (0,)


def test_a_lost_connection_is_unavailable_and_the_batch_commits_after_it(
    database_url: str, meter_id: str
) -> None:
    setup(database_url, [meter_id], "SELECT 1")
    batch = [candidate(KEY, meter_id, s, T0 + s, s, s) for s in (1, 2)]

    with psycopg.connect(database_url, autocommit=True) as conn:
        store = ReadingStore(conn, limit=RateLimit(60_000, 1000), policy=QuarantinePolicy())
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        with pytest.raises(UnavailableError):
            store.commit_batch(batch, [])
    assert [type(o) for o in commit(database_url, batch).outcomes] == [Accepted, Accepted]
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM rejected_readings").fetchone() == (0,)


def test_a_batch_that_fails_leaves_no_transaction_and_no_lock_behind(
    database_url: str, meter_id: str
) -> None:
    """The store sends BEGIN itself: after a failure a retry may fix (here a lock wait that
    timed out), its connection is out of that transaction, so the meter is free for other
    workers and the same store commits the batch on its next try."""
    setup(database_url, [meter_id], "SELECT 1")
    batch = [candidate(KEY, meter_id, s, T0 + s, s, s) for s in (1, 2)]

    with (
        psycopg.connect(database_url, autocommit=True, options="-c lock_timeout=200") as conn,
        psycopg.connect(database_url) as other,
    ):
        store = ReadingStore(conn, limit=RateLimit(60_000, 1000), policy=QuarantinePolicy())
        other.execute("SELECT 1 FROM meters WHERE meter_id = %s FOR UPDATE", (meter_id,))
        with pytest.raises(UnavailableError, match="LockNotAvailable"):
            store.commit_batch(batch, [])
        other.rollback()
        assert conn.info.transaction_status is psycopg.pq.TransactionStatus.IDLE
        assert [type(o) for o in store.commit_batch(batch, []).outcomes] == [Accepted, Accepted]
        other.execute("SELECT 1 FROM meters WHERE meter_id = %s FOR UPDATE NOWAIT", (meter_id,))
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM reading_log").fetchone() == (2,)


@pytest.mark.slow
def test_a_running_worker_parks_a_refused_reading_and_receipts_it_as_store_refused(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    meter_id: str,
) -> None:
    """End to end: PUBACK, receipts for all, the metric, and a republished copy of the
    parked reading refused again (never "accepted", never held up)."""
    key = provision(pki, database_url, meter_id)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(REFUSE)
    settings = worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=redis_server.url,
        batch_linger_ms=200,
    )  # fmt: skip
    metric = telemetry.REJECTED.labels(reason="store_refused")
    before = metric._value.get()
    t0 = int(time.time() * 1000) - 60_000

    async def scenario() -> list[dict[str, object]]:
        async with running_worker(settings):
            meter = ProbeMeter(meter_id, key, pki, broker.port)
            await meter.connect()
            refused = meter.reading(3, ts=t0 + 3000, imp=3, exp=666)
            for seq in (1, 2):
                meter.publish(meter.reading(seq, ts=t0 + seq * 1000, imp=seq, exp=seq))
            meter.publish(refused)
            for seq in (4, 5):
                meter.publish(meter.reading(seq, ts=t0 + seq * 1000, imp=seq, exp=700 + seq))
            await meter.wait_receipts(5)
            meter.publish(refused)
            receipts = await meter.wait_receipts(6)
            await meter.close()
            return receipts

    receipts = asyncio.run(scenario())
    by_seq = sorted((r["seq"], r["status"], r["reason"]) for r in receipts[:5])  # type: ignore[type-var]
    assert by_seq == [
        (1, "accepted", None),
        (2, "accepted", None),
        (3, "rejected", "store_refused"),
        (4, "accepted", None),
        (5, "accepted", None),
    ]
    assert (receipts[5]["seq"], receipts[5]["reason"]) == (3, "store_refused")
    assert stored_counts(database_url, [meter_id]) == {(meter_id, s): 1 for s in (1, 2, 4, 5)}
    assert metric._value.get() - before == 2
