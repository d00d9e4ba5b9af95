"""`meterproof p1 run` end to end, as an operator starts it: telegrams written to a real
pseudo-terminal (the reader opens the slave's tty path with --serial, as it would
/dev/ttyUSB0) or served over TCP (as a ser2net adapter does) become signed readings that
a real ingest worker stores and receipts; a broker restart in the middle loses none.

The telegrams carry current times (one second apart, ending about now), so the worker's
clock-skew rule accepts them; the reader publishes every one (--interval 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from fixtures.p1.telegrams import Registers, dsmr5, dsmr_time
from ingest_harness import provision, running_worker, stored_counts, worker_settings
from waiting import async_wait_until

from meterproof.certs.layout import PkiLayout
from meterproof.config import StackEnv
from meterproof.ingest.settings import IngestSettings
from meterproof.meter.p1.reader import JOURNAL_NAME
from meterproof.stack.broker import BrokerServer
from meterproof.stack.process import free_port
from meterproof.stack.redis import RedisServer

#: between two telegrams on the line (a real meter: 1 s); the telegram times are 1 s apart
PACE_S = 0.05


def telegrams(count: int) -> list[bytes]:
    """DSMR 5 telegrams with times one second apart ending now, registers rising."""
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=count)
    made = []
    for n in range(count):
        kwh = Decimal(1_581_123 + 7 * n) / 1000
        regs = Registers(t1=f"{kwh:010.3f}", t2="000000.000")
        made.append(dsmr5(dsmr_time(start + timedelta(seconds=n)), regs))
    return made


def import_wh(telegram: bytes) -> int:
    line = telegram.split(b"1-0:1.8.1(")[1].split(b"*")[0]
    return int(Decimal(line.decode()) * 1000)


class Reader:
    """`meterproof p1 run` in a child process; its JSON log and summary go to a file."""

    def __init__(self, tmp_path: Path, pki: PkiLayout, port: int, meter_id: str) -> None:
        self.env_file = tmp_path / "stack.env"
        StackEnv(run_dir=tmp_path, pki_root=pki.root, mqtt_port=port).write(self.env_file)
        self.state = tmp_path / "reader-state"
        self.log = tmp_path / "reader.log"
        self.meter_id = meter_id
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *source: str) -> None:
        argv = [sys.executable, "-P", "-m", "meterproof", "p1", "run", *source]
        argv += ["--meter-id", self.meter_id, "--interval", "0", "--republish-after", "2"]
        argv += ["--state-dir", str(self.state), "--stack-env", str(self.env_file)]
        with self.log.open("ab") as sink:
            self.proc = subprocess.Popen(argv, stdout=sink, stderr=sink)

    def logged(self, event: str) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"reader exited: {self.log.read_text()[-3000:]}")
        return self.log.exists() and event.encode() in self.log.read_bytes()

    def outbox(self) -> list[Path]:
        return sorted((self.state / "outbox").glob("*.json"))

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def stored(database_url: str, meter_id: str) -> list[tuple[int, int, str]]:
    """(seq, import_wh, reading_hash) of every stored reading of the meter, by seq."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT seq, import_wh, encode(reading_hash, 'hex') FROM readings"
            " WHERE meter_id = %s ORDER BY seq",
            (meter_id,),
        ).fetchall()
    return [(int(s), int(i), str(h)) for s, i, h in rows]


def assert_all_stored_once(
    database_url: str, reader: Reader, sent: list[bytes], published: list[bytes]
) -> None:
    """Every published telegram is one stored reading, tied to it by the journal."""
    counts = stored_counts(database_url, [reader.meter_id])
    assert sorted(counts.values()) == [1] * len(published)
    rows = stored(database_url, reader.meter_id)
    assert [wh for _, wh, _ in rows] == [import_wh(t) for t in published]
    journal = [
        line.split('"telegram_sha256": "')[1][:64]
        for line in (reader.state / JOURNAL_NAME).read_text().splitlines()
    ]
    assert journal == [hashlib.sha256(t).hexdigest() for t in published]
    assert reader.outbox() == []
    assert set(published) <= set(sent)


@pytest.fixture
def reader(
    tmp_path: Path, pki: PkiLayout, broker: BrokerServer, database_url: str, meter_id: str
) -> Iterator[Callable[[], Reader]]:
    provision(pki, database_url, meter_id)
    made: list[Reader] = []

    def make() -> Reader:
        made.append(Reader(tmp_path, pki, broker.port, meter_id))
        return made[-1]

    yield make
    for r in made:
        r.kill()


async def until_stored(database_url: str, meter_id: str, count: int, within_s: float = 30) -> None:
    await async_wait_until(
        lambda: len(stored(database_url, meter_id)) >= count,
        what=f"{count} readings stored",
        within_s=within_s,
    )


def through_a_pty(
    p1: Reader, settings: IngestSettings, database_url: str, sent: list[bytes], *, stored: int
) -> None:
    """With a worker running, write `sent` into a real pseudo-terminal the reader reads,
    one every PACE_S; return once `stored` readings are stored and receipted and the
    reader stopped cleanly."""
    master, slave = os.openpty()

    async def scenario() -> None:
        async with running_worker(settings):
            p1.start("--serial", os.ttyname(slave))
            await async_wait_until(lambda: p1.logged("p1.source_open"), what="port open")
            for telegram in sent:
                os.write(master, telegram)
                await asyncio.sleep(PACE_S)
            await until_stored(database_url, p1.meter_id, stored)
            await async_wait_until(lambda: p1.outbox() == [], what="every reading receipted")
            assert await asyncio.to_thread(p1.stop) == 0

    try:
        asyncio.run(scenario())
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.slow
def test_a_reader_on_a_pseudo_terminal_stores_every_telegram_and_empties_its_outbox(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    reader: Callable[[], Reader],
) -> None:
    settings = worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=redis_server.url
    )
    sent = telegrams(8)
    p1 = reader()
    through_a_pty(p1, settings, database_url, sent, stored=len(sent))
    assert_all_stored_once(database_url, p1, sent, sent)
    assert "published 8" in p1.log.read_text()
    assert '"baudrate": 115200' in p1.log.read_text()  # DSMR 5's line settings


@pytest.mark.slow
def test_one_telegram_from_a_clock_far_ahead_is_refused_and_the_next_ones_are_stored(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    reader: Callable[[], Reader],
) -> None:
    # The meter's clock jumps an hour ahead for one telegram, then is right again: that
    # one is refused (the ingest side would refuse it as timestamp_skew), and it must not
    # make every correct telegram after it look as if time went backwards.
    settings = worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=redis_server.url
    )
    good = telegrams(4)
    ahead = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    future = dsmr5(dsmr_time(ahead), Registers(t1="001581.000", t2="000000.000"))
    p1 = reader()
    through_a_pty(p1, settings, database_url, [future, *good], stored=len(good))
    assert_all_stored_once(database_url, p1, good, good)
    log = p1.log.read_text()
    assert '"reason": "timestamp_skew"' in log
    assert "'timestamp_skew': 1" in log
    assert "time_backwards" not in log


@contextlib.asynccontextmanager
async def ser2net(
    *streams: list[bytes], pace_s: float = PACE_S
) -> AsyncIterator[tuple[int, asyncio.Event]]:
    """A TCP server that writes the n-th stream's pieces to its n-th client, paced like a
    meter. It hangs up after every stream but the last, and keeps the last line open (as
    an adapter does) until the test is over; `done` is set once the last is written."""
    done, closing = asyncio.Event(), asyncio.Event()
    handlers: set[asyncio.Task[None]] = set()
    turns = iter(streams)

    async def serve(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        stream = next(turns, [])
        try:
            for piece in stream:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(pace_s)
            if stream is streams[-1]:
                done.set()
                await closing.wait()
        except ConnectionError:
            pass  # the reader went away
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        async with server:
            yield server.sockets[0].getsockname()[1], done
    finally:
        closing.set()
        await asyncio.gather(*handlers)


@pytest.mark.slow
def test_a_reader_over_tcp_refuses_bad_telegrams_and_stores_the_good_ones(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    reader: Callable[[], Reader],
) -> None:
    settings = worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=redis_server.url
    )
    good = telegrams(6)
    broken = good[2][:-6] + b"0000\r\n"  # its CRC no longer matches
    stream = [b"\xff\x00noise", good[0], good[1], broken, good[3][:200], good[4], good[5]]
    published = [good[0], good[1], good[4], good[5]]
    p1 = reader()
    metrics_port = free_port()

    async def scenario() -> bytes:
        async with running_worker(settings), ser2net(stream) as (port, done):
            p1.start("--tcp", f"127.0.0.1:{port}", "--metrics-port", str(metrics_port))
            await done.wait()
            await until_stored(database_url, p1.meter_id, len(published))
            await async_wait_until(lambda: p1.outbox() == [], what="every reading receipted")
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read())
            assert await asyncio.to_thread(p1.stop) == 0
            return bytes(metrics)

    metrics = asyncio.run(scenario())
    assert b'meterproof_p1_telegrams_total{outcome="crc_mismatch"} 1.0' in metrics
    assert_all_stored_once(database_url, p1, good, published)
    log = p1.log.read_text()
    assert '"reason": "crc_mismatch"' in log
    assert '"reason": "truncated"' in log
    assert "'crc_mismatch': 1" in log
    assert "'truncated': 1" in log


@pytest.mark.slow
def test_the_reader_survives_a_broker_restart_without_losing_a_reading(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    reader: Callable[[], Reader],
) -> None:
    settings = worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=redis_server.url
    )
    sent = telegrams(30)
    p1 = reader()

    async def scenario() -> None:
        # 30 telegrams over 6 s: the restart comes after the first 8 are stored, while
        # the rest are still arriving.
        async with running_worker(settings), ser2net(sent, pace_s=0.2) as (port, done):
            p1.start("--tcp", f"127.0.0.1:{port}")
            await until_stored(database_url, p1.meter_id, 8)
            await asyncio.to_thread(broker.restart)
            assert not done.is_set()
            await done.wait()
            await until_stored(database_url, p1.meter_id, len(sent), within_s=60)
            await async_wait_until(
                lambda: p1.outbox() == [], what="every reading receipted", within_s=30
            )
            assert await asyncio.to_thread(p1.stop) == 0

    asyncio.run(scenario())
    assert_all_stored_once(database_url, p1, sent, sent)
    assert [seq for seq, _, _ in stored(database_url, p1.meter_id)] == list(range(1, 31))
    assert "mqtt.link_lost" in p1.log.read_text()  # the restart did cut the reader off


@pytest.mark.slow
def test_a_dropped_tcp_stream_is_reopened_and_its_cut_telegram_refused(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    reader: Callable[[], Reader],
) -> None:
    settings = worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=redis_server.url
    )
    sent = telegrams(4)
    first, second = [sent[0], sent[1][:300]], [sent[2], sent[3]]
    p1 = reader()

    async def scenario() -> None:
        async with running_worker(settings), ser2net(first, second) as (port, done):
            p1.start("--tcp", f"127.0.0.1:{port}")
            await done.wait()
            await until_stored(database_url, p1.meter_id, 3)
            await async_wait_until(lambda: p1.outbox() == [], what="every reading receipted")
            assert await asyncio.to_thread(p1.stop) == 0

    asyncio.run(scenario())
    assert_all_stored_once(database_url, p1, sent, [sent[0], sent[2], sent[3]])
    log = p1.log.read_text()
    assert log.count("p1.source_open") == 2
    assert '"event": "p1.source_lost"' in log
    assert '"reason": "truncated"' in log


@pytest.mark.slow
def test_a_recording_is_published_once_and_the_run_ends_when_all_is_receipted(
    tmp_path: Path,
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    reader: Callable[[], Reader],
) -> None:
    settings = worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=redis_server.url
    )
    sent = telegrams(5)
    recording = tmp_path / "recording.txt"
    recording.write_bytes(b"".join(sent))
    p1 = reader()

    async def scenario() -> None:
        async with running_worker(settings):
            p1.start("--file", str(recording))
            assert p1.proc is not None
            assert await asyncio.to_thread(p1.proc.wait, 30) == 0

    asyncio.run(scenario())
    assert_all_stored_once(database_url, p1, sent, sent)
