"""The bridge process: claim -> seal -> (pending) -> submit -> (anchored) -> publish.

The order of effects is the design:
  1. claim and seal in PostgreSQL (`BatchStore.advance`): a sealed batch is 'pending', with
     its entry built and signed, before anything is sent anywhere;
  2. take the oldest pending batch only: batch N+1 never goes before N is anchored;
  3. count the attempt (committed), then submit with the key epoch:batch:root;
  4. record the sink's receipt: 'anchored';
  5. publish the summary (best effort; see bridge.publish).
After a crash anywhere, a pending batch with attempts is first looked up in the sink
(`fetch`) and only resubmitted when the sink does not have it; the sink deduplicates on
the key anyway. A failing sink or database delays everything behind it, with exponential
backoff and jitter, and loses or reorders nothing; one gone silent (a paused or cut-off
primary) fails the pass after `database_timeout_s` (`meterproof.db.silence`) as if it
had closed the connection.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from functools import partial
from typing import Protocol

import psycopg
import structlog

from meterproof.backoff import Backoff
from meterproof.bridge.batches import BatchStore, Step
from meterproof.bridge.entry import Entry
from meterproof.bridge.faults import crash_point
from meterproof.bridge.ledger.sink import (
    LedgerSink,
    Receipt,
    SinkError,
    SinkPendingError,
    SinkRejectedError,
)
from meterproof.bridge.mint import UNITS_PER_GRID, format_grid
from meterproof.bridge.oracle import Oracle
from meterproof.bridge.publish import summary
from meterproof.bridge.settings import BridgeSettings
from meterproof.bridge.telemetry import (
    ANCHORING_LAG,
    ANCHORS_LOST,
    AWAITING_CONFIRMATION,
    BATCHES_PENDING,
    EPOCHS_SEALED,
    GRID_MINTED,
    PENDING_CREDITS,
    READINGS_ANCHORED,
    READINGS_CLAIMED,
    SUBMISSIONS_FAILED,
)
from meterproof.db.connect import connect_sync
from meterproof.db.migrate import ensure_partitions
from meterproof.db.silence import bounded, cut, deadline
from meterproof.errors import first_line
from meterproof.schemas.timestamps import wall_ms

log = structlog.get_logger("bridge")

_MIN_SLEEP_S = 0.01
#: How often the bridge creates the coming days' readings partitions (the only process that
#: does; `db migrate` creates the first week).
_PARTITIONS_EVERY_MS = 3_600_000


class Publisher(Protocol):
    def publish(self, payload: bytes) -> None: ...


class Runner:
    def __init__(
        self,
        settings: BridgeSettings,
        *,
        sink: LedgerSink,
        oracle: Oracle,
        publisher: Publisher | None,
        clock: Callable[[], int] = wall_ms,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._settings = settings
        self._sink = sink
        self._oracle = oracle
        self._publisher = publisher
        self._clock = clock
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._sink_backoff = Backoff(settings.retry_initial_s, settings.retry_max_s, jitter)
        self._db_backoff = Backoff(settings.retry_initial_s, settings.retry_max_s, jitter)
        self._retry_at_ms = 0
        self._partitions_at_ms: int | None = None
        self._recheck_at_ms = 0
        self._database_reached = False

    def run(self, stop: threading.Event) -> None:
        """Until `stop` is set; each pass ends before the process does."""
        self._publish_latest()
        while not stop.is_set():
            stop.wait(self.run_once())
        self.close()

    def ready(self) -> bool:
        """The last pass reached the database: the bridge can seal and anchor (a failing
        sink is retried and shows in its own metrics, the bridge itself is still able)."""
        return self._database_reached

    def close(self) -> None:
        self._sink.close()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def run_once(self) -> float:
        """One pass over everything that is due; returns the seconds until the next one."""
        s = self._settings
        try:
            store = self._store()
            self._ensure_partitions()
            step = store.advance(
                self._clock(),
                epoch_ms=s.epoch_ms,
                delay_ms=round(s.seal_delay_s * 1000),
                oracle=self._oracle,
            )
            self._record(step)
            self._recheck(store)
            self._anchor(store)
            pending, units = store.pending_count()
        except psycopg.Error as exc:
            self._database_reached = False
            delay = self._db_backoff.next_s()
            log.error("database_failed", error=first_line(exc), retry_in_s=round(delay, 2))
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            return delay
        self._db_backoff.reset()
        self._database_reached = True
        BATCHES_PENDING.set(pending)
        PENDING_CREDITS.set(units / UNITS_PER_GRID)
        return self._next_wake(step, pending)

    def _store(self) -> BatchStore:
        if self._conn is None or self._conn.closed:
            self._conn = connect_sync(
                bounded(self._settings.database_url, self._settings.database_timeout_s),
                autocommit=True,
            )
        return BatchStore(self._conn, within_s=self._settings.database_timeout_s)

    def _ensure_partitions(self) -> None:
        now = self._clock()
        if self._partitions_at_ms is not None and now < self._partitions_at_ms:
            return
        assert self._conn is not None
        within_s, cut_off = self._settings.database_timeout_s, partial(cut, self._conn)
        with deadline(within_s=within_s, cut_off=cut_off, wait="bridge"):
            created = ensure_partitions(self._conn)
        if created:
            log.info("partitions_created", count=created)
        self._partitions_at_ms = now + _PARTITIONS_EVERY_MS

    def _record(self, step: Step) -> None:
        READINGS_CLAIMED.inc(step.claimed)
        for entry in step.sealed:
            EPOCHS_SEALED.inc()
            h = entry.header
            log.info(
                "batch_sealed",
                batch=h.batch,
                epoch=h.epoch,
                readings=h.reading_count,
                merkle_root=h.merkle_root.hex(),
                mints=len(entry.mints),
                minted_grid=format_grid(entry.minted_units),
            )

    def _anchor(self, store: BatchStore) -> None:
        while self._clock() >= self._retry_at_ms:
            pending = store.first_pending()
            if pending is None:
                return
            entry = pending.entry
            try:
                receipt = self._deliver(store, pending.batch, entry, pending.attempts)
            except SinkPendingError as exc:
                AWAITING_CONFIRMATION.inc()
                self._retry_at_ms = self._clock() + round(self._settings.retry_initial_s * 1000)
                log.info("anchor_unconfirmed", batch=pending.batch, detail=str(exc))
                return
            except SinkError as exc:
                self._failed(store, pending.batch, exc)
                return
            self._sink_backoff.reset()
            store.mark_anchored(pending.batch, receipt)
            self._anchored(entry, receipt)

    def _recheck(self, store: BatchStore) -> None:
        """Ask the sink again for the newest anchored batches: a chain can drop an anchor
        in a reorg. The first one missing goes back to pending with everything after it,
        and is anchored again (looked up first, so never twice)."""
        every_ms = round(self._settings.recheck_interval_s * 1000)
        if not every_ms or self._clock() < self._recheck_at_ms:
            return
        self._recheck_at_ms = self._clock() + every_ms
        for batch, key in store.recently_anchored(self._settings.recheck_batches):
            try:
                found = self._sink.fetch(key)
            except SinkPendingError:
                continue
            except SinkError as exc:
                log.warning("recheck_failed", batch=batch, code=exc.code, detail=str(exc))
                return
            if found is None:
                reopened = store.reopen(batch)
                ANCHORS_LOST.inc(reopened)
                log.error("anchor_lost", batch=batch, reopened=reopened, sink=self._sink.name)
                break

    def _deliver(self, store: BatchStore, batch: int, entry: Entry, attempts: int) -> Receipt:
        key = entry.header.idempotency_key
        receipt = self._sink.fetch(key) if attempts else None
        if receipt is None:
            store.count_attempt(batch)
            crash_point("before_submit")
            receipt = self._sink.submit(entry, key)
            crash_point("after_submit")
        if receipt.entry_hash != entry.header.entry_hash:
            raise SinkRejectedError("conflict", f"the sink holds another entry under {key}")
        return receipt

    def _failed(self, store: BatchStore, batch: int, exc: SinkError) -> None:
        delay = self._sink_backoff.next_s()
        self._retry_at_ms = self._clock() + round(delay * 1000)
        SUBMISSIONS_FAILED.labels(code=exc.code).inc()
        store.record_failure(batch, str(exc))
        event = log.error if isinstance(exc, SinkRejectedError) else log.warning
        event(
            "submission_failed",
            batch=batch,
            code=exc.code,
            detail=str(exc),
            failures=self._sink_backoff.failures,
            retry_in_s=round(delay, 2),
        )

    def _anchored(self, entry: Entry, receipt: Receipt) -> None:
        h = entry.header
        lag_s = max(0.0, (self._clock() - (h.epoch_start_ms + h.epoch_ms)) / 1000)
        READINGS_ANCHORED.inc(h.reading_count)
        GRID_MINTED.inc(entry.minted_units / UNITS_PER_GRID)
        ANCHORING_LAG.observe(lag_s)
        log.info(
            "batch_anchored",
            batch=h.batch,
            epoch=h.epoch,
            readings=h.reading_count,
            entry_hash=h.entry_hash.hex(),
            sink=receipt.sink,
            reference=receipt.reference,
            lag_s=round(lag_s, 3),
        )
        self._publish_latest()

    def _publish_latest(self) -> None:
        if self._publisher is None:
            return
        try:
            latest = self._store().latest_anchored()
        except psycopg.Error as exc:
            log.warning("summary_deferred", error=first_line(exc))
            return
        if latest is not None:
            self._publisher.publish(summary(latest))

    def _next_wake(self, step: Step, pending: int) -> float:
        s = self._settings
        now = self._clock()
        wake = now + round(s.claim_interval_s * 1000)
        if step.open_epoch is not None:
            wake = min(wake, step.open_epoch.end_ms + round(s.seal_delay_s * 1000))
        if pending:
            wake = min(wake, self._retry_at_ms)
        return max(_MIN_SLEEP_S, (wake - now) / 1000)
