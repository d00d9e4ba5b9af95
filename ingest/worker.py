"""One ingest worker process: source -> decode -> verify -> replay -> store -> ack/publish.

The order of effects is the design, written down once, here:
    store -> commit -> PUBACK -> verified copies -> receipt -> mark seen in Redis.
Nothing is acknowledged before the commit that makes its outcome durable; a crash at any
point leaves unacknowledged messages, which the broker redelivers and the store recognises.
A reading's receipt follows its verified copies: a meter without its receipt publishes
the reading again, and a reading judged `duplicate` is announced again as an accepted one
is, so a copy lost with a worker (a kill -9 after its commit, an announcement given up
when stopping) goes out with the republish (`_announce`).

Backpressure: the broker sends at most the session's `receive_maximum` unacknowledged
messages, and a message is acknowledged only after its batch commits; when the database is
slow or down, batches are retried with backoff, the window fills, and the broker stops
sending. Memory is bounded by the receive maximum, never by the backlog.

The worker receives its source and its store factory (`run_worker` wires the MQTT source
and PostgreSQL), the way the bridge's runner receives its ledger sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Final, Protocol, TypeVar

import psycopg
import structlog
from psycopg import Connection

from meterproof.backoff import Backoff
from meterproof.db.connect import connect_sync
from meterproof.db.silence import answered, bounded
from meterproof.errors import UnavailableError, first_line
from meterproof.ingest import telemetry as t
from meterproof.ingest.audience import Audience
from meterproof.ingest.batcher import Batcher
from meterproof.ingest.decode import Decoded
from meterproof.ingest.follow import (
    FOLLOW_CHANGES,
    STALE_TICKS,
    STORE_BUSY,
    SUBSCRIBED,
    Change,
    Follower,
    FollowPolicy,
    LoadBoard,
    LoadMeter,
    LoadReport,
)
from meterproof.ingest.judge import RateLimit
from meterproof.ingest.keys import KeyCache
from meterproof.ingest.pipeline import decode_all, split_replayed, verify_all
from meterproof.ingest.publish import receipt, verified
from meterproof.ingest.records import Accepted, Candidate, Duplicate, Outcome, Rejection
from meterproof.ingest.replay import RedisReplayCache, ReplayCache
from meterproof.ingest.security import QuarantinePolicy
from meterproof.ingest.settings import IngestSettings
from meterproof.ingest.source import BrokerRefusedError, Delivery, Source, mqtt_source
from meterproof.ingest.store import STORE_OPTIONS, BatchResult, CommitInDoubt, ReadingStore
from meterproof.ingest.verify import TimeBounds
from meterproof.probes import serve_probes
from meterproof.schemas import topics
from meterproof.schemas.reading import RejectReason
from meterproof.schemas.timestamps import wall_ms

log = structlog.get_logger("ingest.worker")
_T = TypeVar("_T")
#: Readings decoded or verified between two turns of the event loop (~3 ms of CPU).
_YIELD_EVERY: Final = 64
#: How long a stopping worker still waits for the announcement in flight (`_announced`).
_ANNOUNCE_GRACE_S: Final = 5.0
#: sysexits' EX_SOFTWARE: the exit code of a worker ended by an error of its own (`_failed`).
_EX_SOFTWARE: Final = 70


class BatchStore(Protocol):
    """One transaction per batch: rules 7-9, the rows, the quarantines (`ReadingStore`).
    Synchronous: it runs on the store's thread."""

    def commit_batch(
        self, candidates: Sequence[Candidate], rejections: Sequence[Rejection]
    ) -> BatchResult: ...

    def close(self) -> None: ...

    def abort(self) -> None:
        """Called from the worker's loop while `commit_batch` waits: end that wait now."""


#: Opens a store (on the store's thread); raises `UnavailableError` when it cannot.
StoreFactory = Callable[[], BatchStore]


class _StoreThread:
    """PostgreSQL transactions in a thread of their own, one at a time.

    A transaction holds its meters' row locks, and every worker gets every meter's readings,
    so transactions of all workers queue on each other: the time a lock is held bounds the
    drain of all workers together. On the worker's loop, each of a transaction's round
    trips waited for the signature checks in hand (measured: locks held 55-120 ms per
    1,000 readings, two workers no faster than one). Here a round trip goes on as soon as
    its answer is in: libpq's waits release the GIL. The signature checks (solders) hold
    it, so while the loop checks a slice the thread may wait up to the interpreter's
    switch interval (5 ms) for it; the drain still ran 1.2x faster with them than with
    libsodium's, which released it (docs/scaling.md).
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")

    async def run(self, call: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def _start_failed(backoff: Backoff, event: str, **detail: object) -> float:
    """Count and log a failed start of the source; returns the wait before the next."""
    t.DEPENDENCY_ERRORS.labels(dependency="broker").inc()
    delay = backoff.next_s()
    log.warning(event, **detail, retry_in_s=round(delay, 3))
    return delay


class _NoReplayCache:
    """Used when Redis is switched off: every lookup misses, the database decides."""

    async def lookup(self, keys: Sequence[tuple[str, int]]) -> list[bytes | None]:
        return [None] * len(keys)

    async def remember(self, entries: Sequence[tuple[str, int, bytes]]) -> None:
        return None

    async def close(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A batch after the stages that need no lock: decoded, verified, looked up in Redis."""

    batch: list[Delivery]
    rejections: list[Rejection]
    fast: list[Duplicate]
    to_store: list[Candidate]

    def meters(self) -> set[str]:
        return {c.reading.meter_id for c in self.to_store}


class Worker:
    def __init__(
        self,
        settings: IngestSettings,
        *,
        source: Source,
        store_factory: StoreFactory,
        clock: Callable[[], int] = wall_ms,
        shares_load: bool = True,
    ) -> None:
        """`clock` is the server time of rule 6 (unix ms); tests pin it to a vector's time.
        `shares_load`: on the shared subscription, so it reports its load to the others
        and, if a follower, joins and leaves (`ingest.follow`); not so the API's worker."""
        self.settings = settings
        self._clock = clock
        self._source = source
        self._store_factory = store_factory
        # Unbounded here, bounded in fact: the broker sends at most `receive_maximum`
        # unacknowledged messages, and nothing leaves the queue unacknowledged for long.
        self._queue: Batcher[Delivery] = Batcher(
            max_size=settings.batch_max_size, linger_s=settings.batch_linger_ms / 1000
        )
        self._bounds = TimeBounds(settings.max_future_s * 1000, settings.max_age_s * 1000)
        self._keys = KeyCache(
            database_url=settings.database_url,
            ttl_s=settings.key_cache_ttl_s,
            timeout_s=settings.database_timeout_s,
        )
        self._audience = Audience(
            database_url=settings.database_url, timeout_s=settings.database_timeout_s
        )
        self._replay: ReplayCache = (
            RedisReplayCache(
                settings.redis_url,
                ttl_s=settings.replay_ttl_s,
                marks_max=settings.replay_marks_max,
            )
            if settings.redis_url
            else _NoReplayCache()
        )
        self._store: BatchStore | None = None
        self._store_thread = _StoreThread()
        self._load = LoadMeter(window_s=STALE_TICKS * settings.follow_tick_s)
        self._board = (
            LoadBoard(
                settings.redis_url, settings.share_group,
                stale_s=STALE_TICKS * settings.follow_tick_s,
            )
            if settings.redis_url and shares_load
            else None
        )  # fmt: skip
        self._announcing: asyncio.Task[None] | None = None
        self.stopping = asyncio.Event()
        self.committed = 0
        #: Non-zero once the worker gave up: 75 (EX_TEMPFAIL) when cut off from its broker
        #: for too long, 1 when the broker refused it for good (`_start_source`), 70 after
        #: an error of its own (`_failed`).
        self.exit_code = 0

    def ready(self) -> bool:
        return (
            self._source.connected
            and self._keys.listening.is_set()
            and self._audience.loaded.is_set()
        )

    def _receive(self, delivery: Delivery) -> None:
        """Called by the source for every delivery; its PUBACK follows the batch's commit."""
        self._queue.put(delivery)

    async def _watch_broker(self) -> None:
        """gmqtt gives up on some refusals; a worker cut off for too long exits non-zero so
        its supervisor (`--workers`, systemd, Kubernetes) starts a fresh one. Nothing is
        lost: whatever it had not acknowledged is redelivered to the new connection."""
        down_since: float | None = None
        while not self.stopping.is_set():
            await asyncio.sleep(1)
            if self._source.connected:
                down_since = None
                continue
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since > self.settings.broker_lost_exit_s:
                after_s, refused = self.settings.broker_lost_exit_s, self._source.refused
                if refused is None:
                    log.error("broker_unreachable_exiting", after_s=after_s)
                else:  # connected, its subscription refused all along: not unreachable
                    log.error("broker_refused_subscription_exiting", reason_code=refused,
                              after_s=after_s)  # fmt: skip
                self.exit_code = UnavailableError.exit_code
                self.stopping.set()

    async def _start_source(self) -> None:
        """A broker that cannot be reached or refuses the first connection for now (not up
        yet, restarting, busy) is tried again with backoff, as a lost link is; the
        watchdog's `broker_lost_exit_s` bounds the wait the same way. A refusal no retry
        can change (this worker not authorised, banned) ends the worker, `exit_code` 1:
        restarting it at once would be refused the same way. Stopping ends a start in
        progress too: a broker that takes the connection and never answers would hold it
        until the TLS handshake timed out (60 s)."""
        backoff = Backoff(self.settings.retry_initial_s, self.settings.retry_max_s)
        while not self.stopping.is_set():
            try:
                await self._unless_stopping(self._source.start(self._receive))
            except BrokerRefusedError as exc:
                if exc.permanent:
                    log.error("broker_refused_exiting", reason_code=exc.code, error=str(exc))
                    self.exit_code = exc.exit_code
                    self.stopping.set()
                    return
                delay = _start_failed(backoff, "broker_refused_at_start", reason_code=exc.code)
            except OSError as exc:
                delay = _start_failed(backoff, "broker_unreachable_at_start", error=str(exc))
            else:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)

    async def _unless_stopping(self, work: Awaitable[None]) -> None:
        """`work`, cancelled if the worker begins stopping first."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return
        task.result()

    async def run(self) -> None:
        """Batches overlap: while one is in its transaction (on the store's thread), the
        next is decoded and verified and the previous one announced. Transactions stay one
        at a time and in arrival order, so each judges against everything committed before
        it."""
        listener = asyncio.create_task(self._keys.listen(self.stopping), name="registry-listen")
        audience = asyncio.create_task(self._audience.run(self.stopping), name="consent-listen")
        watchdog = asyncio.create_task(self._watch_broker(), name="broker-watchdog")
        following = asyncio.create_task(self._follow_load(), name="follow-load")
        committing: asyncio.Task[set[str] | None] | None = None
        try:
            await self._start_source()
            if not self.stopping.is_set():
                log.info("worker_started", client_id=self.settings.client_id)
            while not self.stopping.is_set():
                batch = await self._next_batch()
                if batch is None:
                    break
                prepared = await self._retrying(partial(self._prepare, batch), batch)
                if prepared is None:
                    continue
                if committing is not None:
                    quarantined = await committing
                    if quarantined is None:  # failed: `_unless_failed`
                        break
                    if quarantined & prepared.meters():  # verified before the quarantine
                        prepared = await self._retrying(partial(self._prepare, batch), batch)
                        if prepared is None:
                            continue
                committing = asyncio.create_task(self._unless_failed(self._commit(prepared)))
                self._queue.store_busy()
                self._load.busy()
                committing.add_done_callback(partial(self._store_free, len(batch)))
        except Exception as exc:  # noqa: BLE001 - any error ends the worker, as `_failed` says
            self._failed(exc)
        finally:
            if committing is not None:
                await committing
            await self._announced()
            watchdog.cancel()
            await self._shutdown(listener, audience, following)

    async def _unless_failed(self, work: Awaitable[_T]) -> _T | None:
        """`work`'s result, or None once it failed (`_failed`)."""
        try:
            return await work
        except Exception as exc:  # noqa: BLE001 - any error ends the worker, as `_failed` says
            self._failed(exc)
            return None

    def _failed(self, exc: Exception) -> None:
        """An error no retry is for (a bug; an adapter's error it did not translate) ends
        the worker at once, `exit_code` 70 and one log line, through the usual shutdown
        (the source disconnected, the store and the caches closed), also when no batch
        follows to notice it. Its batch was acknowledged only if committed; the broker
        redelivers the rest to the next worker on the session."""
        log.error("worker_failed", error=f"{type(exc).__name__}: {first_line(exc)}", exc_info=exc)
        self.exit_code = _EX_SOFTWARE
        self.stopping.set()

    def _store_free(self, readings: int, _: object) -> None:
        self._queue.store_free()
        self._load.free(readings)

    async def _follow_load(self) -> None:
        """Each tick: this worker's load to the board, and, for a follower, the decision
        to join or leave the shared subscription (`ingest.follow`)."""
        settings = self.settings
        follower = (
            Follower(
                FollowPolicy(
                    settings.follow_join_busy, settings.follow_leave_busy,
                    settings.follow_leave_after_s, STALE_TICKS * settings.follow_tick_s,
                )
            )
            if settings.follow_load
            else None
        )  # fmt: skip
        subscribed = not settings.follow_load
        SUBSCRIBED.set(int(subscribed))
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), settings.follow_tick_s)
            busy, rate = self._load.sample()
            STORE_BUSY.set(busy)
            if self._board is None:
                continue
            me = LoadReport(
                settings.identity, follower is not None, subscribed, busy, rate, time.time()
            )
            others = await self._board.exchange(me)
            if follower is None:
                continue
            if others is None:  # Redis is down: nobody can say the group is idle
                change = None if subscribed else Change.NO_ANCHOR
            else:
                change = follower.decide(subscribed, me, others, me.at)
            if change is None:
                continue
            subscribed = change is not Change.GROUP_IDLE
            self._source.subscribe(subscribed)
            SUBSCRIBED.set(int(subscribed))
            FOLLOW_CHANGES.labels(reason=change.value).inc()
            log.info(
                "follower_joined" if subscribed else "follower_left",
                reason=change.value,
                busy=round(busy, 3),
                rate=round(rate, 1),
                others=[(r.identity, round(r.busy, 3), r.subscribed) for r in others or []],
            )

    async def _next_batch(self) -> list[Delivery] | None:
        """The next batch, or None once stopping."""
        getter = asyncio.ensure_future(self._queue.next_batch())
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({getter, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not getter.done():
            getter.cancel()
            return None
        t.QUEUE_DEPTH.set(len(self._queue))
        return getter.result()

    async def _shutdown(self, *listeners: asyncio.Task[None]) -> None:
        """Disconnect first, so nothing more is taken and no PUBACK can follow; what is
        still queued was never committed and will be redelivered."""
        self.stopping.set()
        await self._source.stop()
        dropped = len(self._queue)
        for listener in listeners:
            listener.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
        await self._keys.close()
        await self._replay.close()
        if self._board is not None:
            await self._board.close()
        if self._store is not None:
            await self._store_thread.run(self._store.close)
        self._store_thread.close()
        log.info("worker_stopped", committed=self.committed, left_for_redelivery=dropped)

    async def _retrying(
        self, attempt: Callable[[], Awaitable[_T]], batch: Sequence[Delivery]
    ) -> _T | None:
        """Retry an unavailable dependency with backoff; None if stopping meanwhile (the
        batch is then left unacknowledged, for redelivery)."""
        backoff = Backoff(self.settings.retry_initial_s, self.settings.retry_max_s)
        while True:
            try:
                return await attempt()
            except UnavailableError as exc:
                t.DEPENDENCY_ERRORS.labels(dependency=exc.dependency).inc()
                delay = backoff.next_s()
                log.warning(
                    "batch_retry", error=str(exc), size=len(batch), retry_in_s=round(delay, 3)
                )
                if self.stopping.is_set():
                    log.warning("batch_left_for_redelivery", size=len(batch))
                    return None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), delay)

    async def _prepare(self, batch: list[Delivery]) -> _Prepared:
        """Rules 1-6 and the replay fast path: everything before the transaction, in
        slices between which the loop receives, acknowledges and announces."""
        now_ms = self._clock()
        decoded: list[Decoded] = []
        rejections: list[Rejection] = []
        for i in range(0, len(batch), _YIELD_EVERY):
            passed, rejected = decode_all(d.message for d in batch[i : i + _YIELD_EVERY])
            decoded += passed
            rejections += rejected
            await asyncio.sleep(0)
        snapshots = await self._keys.snapshots({d.reading.meter_id for d in decoded})
        candidates: list[Candidate] = []
        for i in range(0, len(decoded), _YIELD_EVERY):
            verified_now, rejected = verify_all(
                decoded[i : i + _YIELD_EVERY], snapshots, now_ms=now_ms, bounds=self._bounds
            )
            candidates += verified_now
            rejections += rejected
            await asyncio.sleep(0)
        cached = await self._replay.lookup(
            [(c.reading.meter_id, c.reading.seq) for c in candidates]
        )
        fast, to_store = split_replayed(candidates, cached)
        return _Prepared(batch, rejections, fast, to_store)

    async def _commit(self, prepared: _Prepared) -> set[str]:
        """The order of effects: commit -> PUBACK -> receipts and verified -> Redis.
        Returns the meters this batch quarantined once it is committed and acknowledged;
        its announcement goes on meanwhile, so the next transaction need not wait for it
        (at most one announcement runs behind the transaction in hand)."""
        started = time.perf_counter()
        batch = prepared.batch
        result = await self._retrying(partial(self._store_batch, prepared), batch)
        if result is None:
            return set()
        # ---- committed: from here on, effects may be announced ----
        by_message = {
            id(o.message): o for o in (*prepared.rejections, *result.outcomes, *prepared.fast)
        }
        outcomes = [by_message[id(d.message)] for d in batch]  # receipts in arrival order
        self._source.ack(batch)
        for meter_id in result.quarantined:
            self._keys.invalidate(meter_id)
            t.QUARANTINED.inc()
            log.error(
                "meter_quarantined", meter_id=meter_id, failures=self.settings.quarantine_failures
            )
        self.committed += len(batch)
        t.QUEUE_DEPTH.set(len(self._queue))
        # oracle latency runs to the commit: a batch retried for minutes took them too
        self._record(batch, outcomes, self._clock(), time.perf_counter() - started)
        await self._announced()
        self._announcing = asyncio.create_task(self._announce(outcomes))
        self._announcing.add_done_callback(self._announce_done)
        return set(result.quarantined)

    def _announce_done(self, task: asyncio.Task[None]) -> None:
        """An announcement that failed ends the worker now (`_failed`): no batch may come
        after it to notice, and its receipts were never sent."""
        if not task.cancelled() and (error := task.exception()) is not None:
            self._failed(error if isinstance(error, Exception) else RuntimeError(error))

    async def _store_batch(self, prepared: _Prepared) -> BatchResult:
        """Only this path closes the store's connection after a failure: the next batch,
        prepared meanwhile (its key lookup failing too), must not close it under the
        transaction in hand, whose wait on the socket would then never end."""
        store = await self._get_store()
        commit_started = time.perf_counter()
        try:
            result = await answered(
                self._store_thread.run(
                    partial(store.commit_batch, prepared.to_store, prepared.rejections)
                ),
                within_s=self.settings.database_timeout_s,
                cut_off=store.abort,
                wait="transaction",
            )
        except UnavailableError:
            self._store = None
            await self._store_thread.run(store.close)
            raise
        t.COMMIT_SECONDS.observe(time.perf_counter() - commit_started)
        return result

    async def _get_store(self) -> BatchStore:
        if self._store is None:
            self._store = await self._store_thread.run(self._store_factory)
        return self._store

    async def _announced(self) -> None:
        """Wait for the announcement in flight; once stopping, for `_ANNOUNCE_GRACE_S` at
        most, then give it up: with the broker gone and the outbound window full it would
        wait for ever, and neither SIGTERM nor the watchdog could end the worker. Its batch
        is committed: a lost receipt brings the meter's republish, answered `duplicate`
        with its verified copies again; each copy is written before its receipt, on the
        same link, so one given up here took its receipt with it (counted by the source)."""
        announcing = self._announcing
        if announcing is None:
            return
        if not announcing.done() and not self.stopping.is_set():
            stop = asyncio.ensure_future(self.stopping.wait())
            await asyncio.wait({announcing, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
        if not announcing.done():  # stopping: the grace
            await asyncio.wait({announcing}, timeout=_ANNOUNCE_GRACE_S)
        if not announcing.done():
            announcing.cancel()
            await asyncio.wait({announcing})
            log.warning("announcement_abandoned", grace_s=_ANNOUNCE_GRACE_S)
        # an error of its own has ended the worker already (`_announce_done`)

    async def _announce(self, outcomes: Sequence[Outcome]) -> None:
        """Each stored reading's verified copies, then its receipt; then Redis learns the
        batch. A duplicate (same hash) is announced again: its first copies may have been
        lost after the commit, and its receipt ends the meter's republishing, so they are
        written before it. Its `verified_at` is this verification's time."""
        items: list[tuple[str, bytes]] = []
        now_ms = self._clock()
        again = 0
        for o in outcomes:
            if isinstance(o, Accepted):
                self._add_copies(items, o.candidate, now_ms)
            elif isinstance(o, Duplicate):
                self._add_copies(items, o.candidate, now_ms)
                again += 1
                log.debug(
                    "verified_again",
                    meter_id=o.candidate.reading.meter_id,
                    seq=o.candidate.reading.seq,
                    reading_hash=o.candidate.reading_hash.hex(),
                )
            r = receipt(o)
            if r is not None:
                items.append(r)
        await self._source.publish_many(items)
        t.VERIFIED_AGAIN.inc(again)
        await self._replay.remember(
            [
                (o.candidate.reading.meter_id, o.candidate.reading.seq, o.candidate.reading_hash)
                for o in outcomes
                if isinstance(o, Accepted | Duplicate)
            ]
        )

    def _add_copies(self, items: list[tuple[str, bytes]], c: Candidate, now_ms: int) -> None:
        """The verified copy for services and one per integrator whose consent covers it."""
        topic, body = verified(c)
        items.append((topic, body))
        meter_id = c.reading.meter_id
        items.extend(
            (topics.integrator_verified(name, meter_id), body)
            for name in self._audience.of(meter_id, c.reading.ts, now_ms)
        )

    def _record(
        self, batch: list[Delivery], outcomes: Sequence[Outcome], now_ms: int, elapsed_s: float
    ) -> None:
        """One summary line per batch; one line per rejection (meter, reason, hash)."""
        accepted = duplicate = 0
        reasons: dict[str, int] = {}
        for o in outcomes:
            if isinstance(o, Accepted):
                accepted += 1
                t.ORACLE_LATENCY.observe(max(0.0, (now_ms - o.candidate.reading.ts) / 1000))
            elif isinstance(o, Duplicate):
                duplicate += 1
            else:
                reasons[o.reason.value] = reasons.get(o.reason.value, 0) + 1
                log.warning(
                    "reading_rejected",
                    meter_id=o.meter_id,
                    reason=o.reason.value,
                    reading_hash=None if o.reading_hash is None else o.reading_hash.hex(),
                    detail=o.detail,
                )
        t.RECEIVED.inc(len(batch))
        t.ACCEPTED.inc(accepted)
        t.DUPLICATE.inc(duplicate)
        t.BATCH_SIZE.observe(len(batch))
        for reason, n in reasons.items():
            t.REJECTED.labels(reason=reason).inc(n)
        if RejectReason.BAD_SIGNATURE.value in reasons:
            t.SIGNATURE_FAILURES.inc(reasons[RejectReason.BAD_SIGNATURE.value])
        log.info(
            "batch_committed",
            size=len(batch),
            accepted=accepted,
            duplicate=duplicate,
            rejected=reasons,
            ms=round(elapsed_s * 1000, 2),
        )


def postgres_store(
    settings: IngestSettings,
    wrap: Callable[[Connection[tuple[object, ...]], ReadingStore], BatchStore] | None = None,
) -> StoreFactory:
    """The store factory of a real worker: `ReadingStore` on its own connection; `wrap`
    puts another `BatchStore` around it on the same connection (the API's)."""
    limit = RateLimit(settings.rate_window_s * 1000, settings.rate_max_readings)
    policy = QuarantinePolicy(settings.quarantine_failures, settings.quarantine_window_s)
    in_doubt = CommitInDoubt()  # a batch whose COMMIT lost its answer, for the next connection

    url = bounded(settings.database_url, settings.database_timeout_s)

    def connect() -> BatchStore:
        try:
            conn = connect_sync(url, options=STORE_OPTIONS, autocommit=True)
        except (psycopg.Error, OSError) as exc:
            raise UnavailableError("database", f"connect: {exc}") from exc
        store = ReadingStore(conn, limit=limit, policy=policy, in_doubt=in_doubt)
        return store if wrap is None else wrap(conn, store)

    return connect


async def run_worker(settings: IngestSettings) -> None:
    """Run until SIGTERM/SIGINT; the batch in hand is committed, the rest redelivered."""
    worker = Worker(settings, source=mqtt_source(settings), store_factory=postgres_store(settings))
    # The cyclic GC ran every ~700 new containers (a reading makes dozens), scanning the
    # batch in hand again and again; the pipeline makes no cycles worth hunting that often.
    # What exists now (modules, settings) lives as long as the process: never scan it.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    probes = serve_probes(settings.metrics_host, settings.metrics_port, ready=worker.ready)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stopping.set)
    try:
        await worker.run()
    finally:
        if probes is not None:
            probes.close()
    if worker.exit_code:
        raise SystemExit(worker.exit_code)
