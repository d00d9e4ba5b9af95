"""The reference meter client against the real broker: every reading arrives at QoS 1
across a broker restart, a meter restart, an outage and a broker kill -9; receipts
settle readings, silence gets them republished, rejections are reported.

`FakeWorker` (meter_harness) plays the ingest side, answering with receipts as each test's
policy says. Every wait is bounded by `waiting.WITHIN_S`.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner, Result
from fixtures.servers import OwnBroker
from ingest_harness import provision
from meter_harness import Delivered, FakeWorker, accept
from waiting import WITHIN_S, async_wait_until

from meterproof.certs import issue_device
from meterproof.certs.layout import PkiLayout
from meterproof.cli.main import main
from meterproof.config import StackEnv
from meterproof.meter.client import (
    Broker,
    ClientSettings,
    MeterClient,
)
from meterproof.meter.identity import MeterIdentity
from meterproof.meter.network import Network
from meterproof.meter.profile import profile_for
from meterproof.registry.errors import RefusedError
from meterproof.registry.wallets import verify_meter_signature
from meterproof.schemas.reading import Receipt, ReceiptStatus, RejectReason
from meterproof.schemas.timestamps import wall_ms
from meterproof.stack.broker import BrokerServer

#: Reconnect quickly: the broker is restarted under the meters on purpose.
FAST = ClientSettings(reconnect_min_s=0.2, reconnect_max_s=1.0)


@pytest.fixture
def worker(pki: PkiLayout, broker: BrokerServer) -> Iterator[FakeWorker]:
    fake = FakeWorker(pki, broker.port)
    fake.start()
    yield fake
    fake.stop()


def make_meter(
    pki: PkiLayout,
    broker: BrokerServer,
    network: Network,
    meter_id: str,
    state_dir: Path,
    settings: ClientSettings = FAST,
) -> MeterClient:
    if not pki.device(meter_id).meta.exists():
        issue_device(pki, meter_id)
    return MeterClient(
        MeterIdentity.load(pki.device(meter_id)),
        broker=Broker("127.0.0.1", broker.port, pki.ca_cert),
        state_dir=state_dir,
        network=network,
        settings=settings,
    )


def submit(client: MeterClient) -> int:
    measurement = profile_for(client.meter_id).measure(wall_ms(), random.Random())
    return client.submit(measurement).seq


def assert_no_seq_reused(deliveries: list[Delivered]) -> None:
    """A republish is byte-identical; two payloads under one seq would be a reused nonce."""
    payloads: dict[int, set[bytes]] = {}
    for d in deliveries:
        payloads.setdefault(d.seq, set()).add(d.payload)
    assert all(len(p) == 1 for p in payloads.values())


@pytest.mark.slow
def test_every_reading_arrives_across_a_broker_restart(
    pki: PkiLayout, broker: BrokerServer, worker: FakeWorker, meter_id: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with Network() as network:
            meter = make_meter(pki, broker, network, meter_id, tmp_path)
            meter.start()
            await async_wait_until(lambda: meter.connected, what="meter connected")
            restart = None
            for n in range(40):
                submit(meter)
                if n == 10:
                    restart = asyncio.create_task(asyncio.to_thread(broker.restart))
                # Pacing, not waiting: spread the readings over the restart, so some are
                # submitted before it, some while the broker is down, some after.
                await asyncio.sleep(0.04)
            assert restart is not None
            await restart
            await async_wait_until(
                lambda: worker.seqs(meter_id) == set(range(1, 41)), what="all 40 seqs"
            )
            assert meter.pending == 40  # nobody sent receipts: all kept for a republish
            await meter.stop()

    asyncio.run(scenario())
    assert_no_seq_reused(worker.deliveries(meter_id))


def test_a_restarted_meter_never_reuses_a_seq_and_uploads_its_backlog(
    pki: PkiLayout, broker: BrokerServer, worker: FakeWorker, meter_id: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with Network() as network:
            first = make_meter(pki, broker, network, meter_id, tmp_path)
            first.start()
            before = [submit(first) for _ in range(5)]
            await async_wait_until(lambda: worker.seqs(meter_id) == set(before), what="first five")
            await first.stop(graceful=False)  # a power cut: no DISCONNECT

            second = make_meter(pki, broker, network, meter_id, tmp_path)
            assert second.pending == 5  # unreceipted, so still in the outbox
            second.start()
            after = [submit(second) for _ in range(5)]
            assert min(after) > max(before)
            await async_wait_until(
                lambda: worker.seqs(meter_id) == {*before, *after}, what="all ten"
            )
            backlog = Counter(d.seq for d in worker.deliveries(meter_id))
            await async_wait_until(
                lambda: all(
                    Counter(d.seq for d in worker.deliveries(meter_id))[s] >= 2 for s in before
                ),
                what="the backlog republished by the new process",
            )
            assert all(backlog[s] == 1 for s in after)
            await second.stop()

    asyncio.run(scenario())
    assert_no_seq_reused(worker.deliveries(meter_id))


@pytest.mark.slow
def test_receipts_settle_readings_and_silence_gets_them_republished(
    pki: PkiLayout, broker: BrokerServer, worker: FakeWorker, meter_id: str, tmp_path: Path
) -> None:
    # The first copy of seq 2 goes unanswered, as if the worker had lost it.
    worker.policy = lambda d, nth: None if (d.seq, nth) == (2, 1) else accept(d, 1)

    async def scenario() -> MeterClient:
        async with Network() as network:
            meter = make_meter(
                pki, broker, network, meter_id, tmp_path, replace(FAST, republish_after_s=0.5)
            )
            meter.start()
            for _ in range(4):
                submit(meter)
            async with asyncio.timeout(WITHIN_S):
                await meter.drain()
            await meter.stop()
            return meter

    meter = asyncio.run(scenario())
    assert meter.stats.accepted == 4
    assert meter.stats.republished >= 1
    assert Counter(d.seq for d in worker.deliveries(meter_id))[2] >= 2
    assert list((tmp_path / "outbox").iterdir()) == []


def test_a_rejected_receipt_is_reported(
    pki: PkiLayout, broker: BrokerServer, worker: FakeWorker, meter_id: str, tmp_path: Path
) -> None:
    def policy(d: Delivered, nth: int) -> Receipt:
        if d.seq == 1:
            return Receipt(
                seq=1,
                reading_hash=d.reading_hash,
                status=ReceiptStatus.REJECTED,
                reason=RejectReason.BAD_SIGNATURE,
            )
        return accept(d, nth)

    worker.policy = policy
    heard: list[tuple[int, ReceiptStatus]] = []

    async def scenario() -> MeterClient:
        async with Network() as network:
            meter = MeterClient(
                MeterIdentity.load(issue_device(pki, meter_id)),
                broker=Broker("127.0.0.1", broker.port, pki.ca_cert),
                state_dir=tmp_path,
                network=network,
                on_receipt=lambda entry, receipt: heard.append((entry.seq, receipt.status)),
            )
            meter.start()
            submit(meter)
            submit(meter)
            async with asyncio.timeout(WITHIN_S):
                await meter.drain()
            await meter.stop()
            return meter

    meter = asyncio.run(scenario())
    assert dict(meter.stats.rejected) == {"bad_signature": 1}
    assert meter.stats.accepted == 1
    assert sorted(heard) == [(1, ReceiptStatus.REJECTED), (2, ReceiptStatus.ACCEPTED)]
    assert meter.pending == 0  # a rejection is final: republishing would not change it


@pytest.mark.slow
def test_buffers_while_the_broker_is_down_and_uploads_the_backlog(
    pki: PkiLayout, broker: BrokerServer, worker: FakeWorker, meter_id: str, tmp_path: Path
) -> None:
    worker.policy = accept

    async def scenario() -> None:
        async with Network() as network:
            meter = make_meter(
                pki, broker, network, meter_id, tmp_path, replace(FAST, max_inflight=3)
            )
            await asyncio.to_thread(broker.stop)
            meter.start()
            for _ in range(30):
                submit(meter)
            # Time passing, not an event: connect attempts fail (reconnect_min_s 0.2) while
            # the meter keeps all 30 readings; nothing happens that a test could wait for.
            await asyncio.sleep(0.5)
            assert not meter.connected
            assert meter.pending == 30
            await asyncio.to_thread(broker.start)
            async with asyncio.timeout(WITHIN_S):
                await meter.drain()
            await meter.stop()

    asyncio.run(scenario())
    assert worker.seqs(meter_id) == set(range(1, 31))


@pytest.mark.slow
def test_after_a_broker_kill9_receipts_still_bring_every_reading_home(
    pki: PkiLayout, own_broker: Callable[..., OwnBroker], meter_id: str, tmp_path: Path
) -> None:
    """The broker acknowledges readings queued for an offline worker, then dies before
    saving them: only the meter's outbox and the missing receipts bring them home.

    A broker of the test's own: the session's would come back with the sessions of its
    last save, other tests' among them, and the worker's identity may have had one."""
    broker = own_broker().server
    worker = FakeWorker(pki, broker.port, policy=accept)
    worker.start()

    async def scenario() -> MeterClient:
        async with Network() as network:
            settings = replace(FAST, republish_after_s=1.0)
            meter = make_meter(pki, broker, network, meter_id, tmp_path, settings)
            meter.start()
            await async_wait_until(lambda: meter.connected, what="meter connected")
            await asyncio.to_thread(worker.pause)
            for _ in range(10):
                submit(meter)
            await async_wait_until(lambda: meter.stats.published == 10, what="ten published")
            await async_wait_until(
                lambda: meter.stats.acknowledged - meter.stats.unrouted >= 10,
                what="the broker's PUBACKs for the ten readings queued for the paused worker",
            )
            await asyncio.to_thread(broker.kill9)
            await asyncio.to_thread(broker.start)
            await asyncio.to_thread(worker.start)
            async with asyncio.timeout(WITHIN_S):
                await meter.drain()
            await meter.stop()
            return meter

    try:
        meter = asyncio.run(scenario())
    finally:
        worker.stop()
    assert worker.seqs(meter_id) == set(range(1, 11))
    assert meter.stats.accepted + meter.stats.duplicate == 10


@pytest.mark.slow
def test_a_reading_no_worker_subscription_took_is_retried_before_the_receipt_timeout(
    pki: PkiLayout, own_broker: Callable[..., OwnBroker], meter_id: str, tmp_path: Path
) -> None:
    """After a broker restart Mosquitto 2.0 has no shared subscription until a worker
    subscribes again, and answers PUBACK 16. The meter retries soon, not after the receipt
    timeout (here far longer than the wait below). A broker of the test's own: on the
    session's, another test's worker session may still hold a subscription."""
    broker = own_broker().server
    worker = FakeWorker(pki, broker.port, policy=accept)
    settings = replace(FAST, republish_after_s=120.0, max_republish_after_s=120.0)

    async def scenario() -> MeterClient:
        async with Network() as network:
            meter = make_meter(pki, broker, network, meter_id, tmp_path, settings)
            meter.start()
            await async_wait_until(lambda: meter.connected, what="meter connected")
            seq = submit(meter)  # nobody subscribes to readings yet: PUBACK 16
            await async_wait_until(
                lambda: meter.stats.unrouted >= 1,
                what="PUBACK 16 (no matching subscribers) for the reading",
            )
            await asyncio.to_thread(worker.start)
            try:
                await async_wait_until(
                    lambda: seq in worker.seqs(meter_id), what="the retried reading"
                )
                async with asyncio.timeout(WITHIN_S):
                    await meter.drain()
            finally:
                worker.stop()
            await meter.stop()
            return meter

    meter = asyncio.run(scenario())
    assert meter.stats.accepted == 1
    assert meter.stats.republished >= 1


def test_sign_document_signs_the_exact_bytes_even_with_crlf_line_ends(
    pki: PkiLayout, database_url: str, meter_id: str, tmp_path: Path
) -> None:
    # A text read would turn CRLF into LF and sign other bytes than the file's.
    provision(pki, database_url, meter_id)
    env_file = tmp_path / "stack.env"
    StackEnv(run_dir=tmp_path, pki_root=pki.root).write(env_file)
    document = f"meterproof link-wallet v1\r\nmeter: {meter_id}\r\n"
    (tmp_path / "link.txt").write_bytes(document.encode("utf-8"))
    (tmp_path / "latin1.txt").write_bytes(b"meterproof link-wallet v1\nmeter: caf\xe9\n")

    def sign(name: str) -> Result:
        argv = ["meter", "sign-document", "--meter-id", meter_id, "--stack-env", str(env_file)]
        return CliRunner().invoke(main, [*argv, str(tmp_path / name)])

    signed = sign("link.txt")
    assert signed.exit_code == 0, signed.output
    kid = signed.stderr.strip().removeprefix("--kid ")
    with psycopg.connect(database_url) as conn, conn.cursor() as cur:
        verify_meter_signature(cur, meter_id, kid, document, signed.stdout)
        with pytest.raises(RefusedError, match="did not sign this"):
            verify_meter_signature(
                cur, meter_id, kid, document.replace("\r\n", "\n"), signed.stdout
            )
    refused = sign("latin1.txt")
    assert refused.exit_code == 1
    assert refused.stderr == "Error: the document is not UTF-8 text (byte 36 cannot be decoded)\n"
