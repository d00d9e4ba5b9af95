"""The fleet simulator against the real broker: every reading of every meter arrives across
a broker restart; against a real ingest worker, every misbehaviour gets the receipt the
spec names; the command's JSON summary and exit status when nobody answers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from ingest_harness import running_worker, worker_settings
from meter_harness import FakeWorker, accept
from waiting import WITHIN_S, async_wait_until

from meterproof.certs.layout import PkiLayout
from meterproof.config import StackEnv
from meterproof.meter.cli import simulate
from meterproof.meter.client import Broker
from meterproof.meter.fleet import issue_fleet, wallet_of
from meterproof.meter.misbehave import Misbehaviour
from meterproof.meter.registry import stack_registrar
from meterproof.meter.simulate import (
    EXIT_OK,
    EXIT_UNRECEIPTED,
    FleetConfig,
    Progress,
    simulate_fleet,
)
from meterproof.schemas.reading import Alg, RejectReason
from meterproof.stack.broker import BrokerServer
from meterproof.stack.redis import RedisServer


@pytest.mark.slow
def test_fleet_delivers_every_reading_across_a_broker_restart(
    pki: PkiLayout, broker: BrokerServer, tmp_path: Path
) -> None:
    identities, _ = issue_fleet(pki, 12, {Alg.EDDSA: 0.5, Alg.ES256: 0.5})
    worker = FakeWorker(pki, broker.port, accept)
    worker.start()
    progress: list[Progress] = []
    config = FleetConfig(
        interval_s=0.5,
        readings=6,
        receipt_timeout_s=WITHIN_S,
        republish_after_s=2.0,
        progress_every_s=0.5,
        seed=7,
    )

    async def scenario() -> None:
        fleet = asyncio.create_task(
            simulate_fleet(
                identities,
                broker=Broker("127.0.0.1", broker.port, pki.ca_cert),
                state_root=tmp_path,
                config=config,
                on_progress=progress.append,
            )
        )
        # Mid-run: the first readings are receipted, most are still to come (six per meter,
        # 0.5 s apart), and some meters may still be starting up.
        await async_wait_until(
            lambda: progress and progress[-1].accepted > 0, what="the first readings accepted"
        )
        await asyncio.to_thread(broker.restart)
        summary = await fleet
        assert summary.sent == summary.accepted + summary.duplicate == 72
        assert (summary.unreceipted, summary.unexpected, summary.exit_code) == (0, 0, EXIT_OK)

    try:
        asyncio.run(scenario())
    finally:
        worker.stop()
    for identity in identities:
        assert worker.seqs(identity.meter_id) == set(range(1, 7))
    assert progress
    assert progress[-1].pending == 0


@pytest.mark.slow
def test_every_misbehaviour_gets_the_receipt_the_spec_names(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    tmp_path: Path,
) -> None:
    """Ten meters, two of each kind, against a real worker with a real registry."""
    identities, csv_path = issue_fleet(pki, 10, {Alg.EDDSA: 0.6, Alg.ES256: 0.4})
    assert stack_registrar(database_url)(csv_path) == 10
    with psycopg.connect(database_url) as conn:
        wallets = dict(
            conn.execute(
                "SELECT meter_id, owner_wallet FROM meters WHERE meter_id = ANY(%s)",
                ([i.meter_id for i in identities],),
            ).fetchall()
        )
    assert wallets == {i.meter_id: wallet_of(i.meter_id) for i in identities}
    settings = worker_settings(
        pki=pki, port=broker.port, database_url=database_url, redis_url=redis_server.url
    )
    config = FleetConfig(
        interval_s=0.5, readings=6, misbehave=1.0, receipt_timeout_s=WITHIN_S, seed=3
    )

    async def scenario() -> None:
        async with running_worker(settings):
            summary = await simulate_fleet(
                identities,
                broker=Broker("127.0.0.1", broker.port, pki.ca_cert),
                state_root=tmp_path,
                config=config,
            )
        assert summary.unexpected == 0, summary.to_dict()
        assert summary.unreceipted == 0
        # A replay, reused seq or rollback waits for an accepted reading to start from;
        # at this pace every misbehaving turn has one, and every bad reading is caught.
        assert summary.caught == summary.misbehaved >= 2 * len(Misbehaviour)
        assert set(summary.rejected) == {
            RejectReason.BAD_SIGNATURE,
            RejectReason.TIMESTAMP_SKEW,
            RejectReason.SEQ_REUSED,
            RejectReason.REGISTER_DECREASED,
        }
        assert summary.duplicate >= 2  # the replays
        assert summary.accepted == summary.sent - summary.misbehaved
        assert summary.exit_code == EXIT_OK

    asyncio.run(scenario())


@pytest.mark.slow
def test_simulate_command_exits_3_and_keeps_readings_nobody_receipted(
    pki: PkiLayout, broker: BrokerServer, tmp_path: Path
) -> None:
    env_file = tmp_path / "stack.env"
    StackEnv(run_dir=tmp_path, pki_root=pki.root, mqtt_port=broker.port).write(env_file)
    args = ["--meters", "3", "--readings", "2", "--interval", "0.2", "--receipt-timeout", "1"]
    args += ["--no-register", "--json", "--stack-env", str(env_file)]
    result = CliRunner().invoke(simulate, args)
    assert result.exit_code == EXIT_UNRECEIPTED, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["sent"] == summary["unreceipted"] == 6
    assert summary["exit_code"] == EXIT_UNRECEIPTED
    assert "meters register --bulk" in result.stderr  # what to run instead
    outboxes = list((tmp_path / "meters").glob("*/outbox/*.json"))
    assert len(outboxes) == 6  # kept for the next run to republish
