"""The P1 reader: source -> telegram -> `Measurement` -> the reference meter client.

The reader is a meter of its own: it signs with its own device identity and publishes
through `MeterClient`, so the outbox, receipts and republishing work as for any meter
and a broker outage loses nothing. Order of effects for one telegram:

1. decode it (`telegram.TelegramDecoder`): refused telegrams are counted and logged;
2. the `Gate` drops readings sooner than --interval after the last published one, and
   refuses a time too far ahead of the reader's clock, or a time or register that went
   backwards (the ingest side would reject them);
3. take a seq (persisted), sign, append seq + reading hash + the raw telegram's SHA-256
   to the telegram journal (`p1-telegrams.jsonl`, fsynced), then hand the reading to
   the client, which stores it in its outbox before publishing. The journal outlives the
   outbox entry (deleted on its receipt): it is what ties a stored reading to the bytes
   the meter sent, for an audit. A crash between 3's steps leaves a journal line for a
   seq never published: a gap, never a reading without its telegram.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Final

import structlog
from prometheus_client import Counter as MetricCounter

from meterproof.backoff import Backoff
from meterproof.errors import UnavailableError
from meterproof.meter.client import Broker, ClientSettings, ClientStats, MeterClient
from meterproof.meter.identity import MeterIdentity
from meterproof.meter.measurement import Measurement
from meterproof.meter.network import Network
from meterproof.meter.outbox import hash_of
from meterproof.meter.p1.sources import Source
from meterproof.meter.p1.telegram import Decoded, Outcome, TelegramDecoder
from meterproof.probes import serve_probes
from meterproof.schemas.reading import MAX_FUTURE_MS
from meterproof.schemas.timestamps import wall_ms

log = structlog.get_logger("meter.p1")

TELEGRAMS = MetricCounter(
    "meterproof_p1_telegrams_total", "P1 telegrams by what became of them", ["outcome"]
)
GARBAGE = MetricCounter("meterproof_p1_garbage_bytes_total", "Bytes skipped between telegrams")
SOURCE_DROPS = MetricCounter(
    "meterproof_p1_source_drops_total", "Serial port or TCP stream lost or not opened"
)

JOURNAL_NAME: Final = "p1-telegrams.jsonl"


@dataclass(slots=True)
class Gate:
    """Which decoded readings are published: at most one per `interval_ms` of meter time,
    time and registers never going backwards (the first reading after a start is
    compared with nothing: the ingest side judges it against what it stored). A time
    further ahead of the reader's clock than `MAX_FUTURE_MS` is refused before it can
    become the last one: it would hold back every correct reading after it."""

    interval_ms: int
    _last: Measurement | None = None

    def __post_init__(self) -> None:
        if self.interval_ms < 0:
            raise ValueError(f"interval must not be negative, not {self.interval_ms} ms")

    def admit(self, measurement: Measurement, *, now_ms: int) -> Outcome:
        if measurement.ts > now_ms + MAX_FUTURE_MS:
            return Outcome.TIMESTAMP_SKEW
        last = self._last
        if last is not None:
            if measurement.ts < last.ts:
                return Outcome.TIME_BACKWARDS
            if measurement.import_wh < last.import_wh or measurement.export_wh < last.export_wh:
                return Outcome.REGISTER_DECREASED
            if measurement.ts - last.ts < max(self.interval_ms, 1):
                return Outcome.THINNED
        self._last = measurement
        return Outcome.ACCEPTED


@dataclass(frozen=True, slots=True)
class JournalEntry:
    seq: int
    reading_hash: str
    telegram_sha256: str
    ts: int


class TelegramJournal:
    """One JSON line per published reading, appended before the reading is sent. A power
    cut during an append can leave a torn last line: the next append starts on a line of
    its own, and reading skips (and logs) the torn line only."""

    def __init__(self, path: Path, *, durable: bool = True) -> None:
        self.path = path
        self.durable = durable
        path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, entry: JournalEntry) -> None:
        line = json.dumps(
            {
                "seq": entry.seq,
                "reading_hash": entry.reading_hash,
                "telegram_sha256": entry.telegram_sha256,
                "ts": entry.ts,
            }
        ).encode("ascii")
        with self.path.open("a+b") as journal:
            if _torn(journal):
                log.warning("p1.journal_torn_line", path=str(self.path))
                line = b"\n" + line
            journal.write(line + b"\n")
            journal.flush()
            if self.durable:
                os.fsync(journal.fileno())

    def entries(self) -> list[JournalEntry]:
        if not self.path.exists():
            return []
        entries: list[JournalEntry] = []
        broken: list[int] = []
        for number, line in enumerate(self.path.read_bytes().splitlines(), start=1):
            if not line:
                continue
            entry = _parse_entry(line)
            if entry is None:
                broken.append(number)
            else:
                entries.append(entry)
        if broken:
            log.warning(
                "p1.journal_lines_skipped",
                path=str(self.path),
                count=len(broken),
                lines=broken[:10],
            )
        return entries


def _torn(journal: BinaryIO) -> bool:
    """Whether the file's last line lacks its line feed (an append cut short)."""
    end = journal.seek(0, os.SEEK_END)
    if end == 0:
        return False
    journal.seek(end - 1)
    return journal.read(1) != b"\n"


def _parse_entry(line: bytes) -> JournalEntry | None:
    """One journal line, or None when it is not a whole entry (a torn or damaged line)."""
    try:
        return JournalEntry(**json.loads(line))
    except (ValueError, TypeError):
        return None


@dataclass(slots=True)
class P1Stats:
    """Plain counters, by `Outcome` value; `accepted` telegrams are the published ones."""

    outcomes: Counter[str] = field(default_factory=Counter)
    garbage_bytes: int = 0
    source_drops: int = 0

    @property
    def published(self) -> int:
        return self.outcomes[Outcome.ACCEPTED.value]


class P1Reader:
    """Feeds bytes through the decoder and the gate into the client; loop thread only."""

    def __init__(
        self,
        client: MeterClient,
        decoder: TelegramDecoder,
        journal: TelegramJournal,
        *,
        interval_s: float,
        clock: Callable[[], int] = wall_ms,
    ) -> None:
        self.client = client
        self.decoder = decoder
        self.journal = journal
        self.gate = Gate(round(interval_s * 1000))
        self.clock = clock
        self.stats = P1Stats()

    def take(self, data: bytes) -> None:
        self._handle(self.decoder.feed(data))

    def end_of_stream(self) -> None:
        self._handle(self.decoder.finish())

    def _handle(self, decoded: list[Decoded]) -> None:
        garbage = self.decoder.garbage_bytes - self.stats.garbage_bytes
        if garbage:
            GARBAGE.inc(garbage)
            self.stats.garbage_bytes += garbage
        for item in decoded:
            outcome, detail = item.outcome, item.detail
            if item.reading is not None:
                now = self.clock()
                measurement = item.reading.measurement(now)
                outcome = self.gate.admit(measurement, now_ms=now)
                if outcome is Outcome.ACCEPTED:
                    self._publish(measurement, item.sha256)
                elif outcome is Outcome.TIMESTAMP_SKEW:
                    detail = f"{(measurement.ts - now) // 1000} s ahead of the reader's clock"
            self._count(outcome, item, detail)

    def _publish(self, measurement: Measurement, telegram_sha256: str) -> None:
        client = self.client
        reading = client.sign(client.reserve_seq(), measurement)
        digest = hash_of(reading)
        self.journal.record(JournalEntry(reading.seq, digest, telegram_sha256, reading.ts))
        client.send(reading)
        log.debug("p1.published", meter_id=client.meter_id, seq=reading.seq, reading_hash=digest)

    def _count(self, outcome: Outcome, item: Decoded, detail: str) -> None:
        self.stats.outcomes[outcome.value] += 1
        TELEGRAMS.labels(outcome=outcome.value).inc()
        if outcome is Outcome.ACCEPTED or outcome is Outcome.THINNED:
            return
        log.warning(
            "p1.telegram_refused",
            meter_id=self.client.meter_id,
            reason=outcome.value,
            detail=detail,
            telegram_sha256=item.sha256,
        )


@dataclass(frozen=True, slots=True)
class ReaderSettings:
    """Every knob with its default, checked when built."""

    #: Publish at most one reading per this many seconds of telegram time (DSMR 5 sends
    #: one a second; the ingest side's default rate limit is 60 a minute per meter).
    interval_s: float = 10.0
    #: How long to wait for the last receipts once the source ended or a stop was asked.
    receipt_timeout_s: float = 30.0
    reopen_min_s: float = 1.0
    reopen_max_s: float = 30.0

    def __post_init__(self) -> None:
        if self.interval_s < 0:
            raise ValueError(f"interval must not be negative, not {self.interval_s}")
        if self.receipt_timeout_s < 0:
            raise ValueError("receipt timeout must not be negative")
        Backoff(self.reopen_min_s, self.reopen_max_s)  # validates the bounds


async def pump(source: Source, reader: P1Reader, settings: ReaderSettings) -> None:
    """Read the source into the reader; reopen a port or socket that drops, with backoff.
    Returns when a finite source (a file) is read; cancel it to stop."""
    reopen = Backoff(settings.reopen_min_s, settings.reopen_max_s)
    while True:
        try:
            async for chunk in source.chunks():
                reopen.reset()
                reader.take(chunk)
        except UnavailableError as exc:
            reader.stats.source_drops += 1
            SOURCE_DROPS.inc()
            log.warning("p1.source_lost", source=source.name, error=str(exc))
        finally:
            reader.end_of_stream()
        if source.finite:
            return
        await asyncio.sleep(reopen.next_s())


@dataclass(frozen=True, slots=True)
class RunResult:
    p1: P1Stats
    client: ClientStats
    unreceipted: int


async def run_p1(
    identity: MeterIdentity,
    *,
    broker: Broker,
    state_dir: Path,
    source: Source,
    decoder: TelegramDecoder,
    settings: ReaderSettings,
    client_settings: ClientSettings | None = None,
    metrics_port: int = 0,
) -> RunResult:
    """Read until the source ends (a file) or SIGINT/SIGTERM, then wait a bounded time
    for the receipts of what was published. With `metrics_port`, /metrics, /healthz and
    /readyz (ready while connected to the broker) are served on loopback."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with Network(connect_workers=1) as network:
            client = MeterClient(
                identity,
                broker=broker,
                state_dir=state_dir,
                network=network,
                settings=client_settings,
            )
            journal = TelegramJournal(state_dir / JOURNAL_NAME, durable=client.settings.durable)
            reader = P1Reader(client, decoder, journal, interval_s=settings.interval_s)
            client.start()
            probes = serve_probes("127.0.0.1", metrics_port, ready=lambda: client.connected)
            log.info("p1.started", meter_id=client.meter_id, source=source.name)
            reading = asyncio.create_task(pump(source, reader, settings))
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            reading.cancel()  # a no-op once a file is read
            with contextlib.suppress(asyncio.CancelledError):
                await stopping
            with contextlib.suppress(asyncio.CancelledError):
                await reading  # raises what ended it early, e.g. an unreadable file
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(settings.receipt_timeout_s):
                    await client.drain()
            await client.stop()
            if probes is not None:
                probes.close()
            log.info(
                "p1.summary",
                meter_id=client.meter_id,
                **{f"telegrams_{k}": v for k, v in sorted(reader.stats.outcomes.items())},
                garbage_bytes=reader.stats.garbage_bytes,
                source_drops=reader.stats.source_drops,
                accepted=client.stats.accepted,
                unreceipted=client.pending,
            )
            return RunResult(reader.stats, client.stats, client.pending)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
