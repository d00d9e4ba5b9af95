"""The test session's broker supervisor: a Mosquitto that dies on its own is started again
and the crash is named; one a test stops stays stopped; every SIGHUP is seen. And the
failover tests' broker pair: a broker that handled a SIGHUP is restarted after the test.
A suite that leans on them to survive Mosquitto 2.0.11's crashes, and to keep their known
cause away from later tests, must know that they work."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.ha import restart_if_reloaded
from fixtures.servers import SupervisedBroker
from waiting import wait_until

from meterproof.certs.layout import PkiLayout
from meterproof.mosquitto.admin import RELOADING, log_end, logged_after
from meterproof.mosquitto.config import render
from meterproof.stack.broker import BrokerServer
from meterproof.stack.process import free_port


@pytest.fixture
def supervised(pki: PkiLayout, tmp_path: Path) -> Iterator[SupervisedBroker]:
    """A supervisor of its own around a broker of the session's config, started."""
    port, admin_port = free_port(), free_port()
    files = render(run_dir=tmp_path, pki=pki, tls_port=port, admin_port=admin_port)
    broker = SupervisedBroker(files, port=port, admin_port=admin_port)
    try:
        broker.start()
        yield broker
    finally:
        broker.close()
        broker.stop()


def test_a_crashed_broker_is_started_again_and_a_stopped_one_is_not(
    supervised: SupervisedBroker,
) -> None:
    broker = supervised
    broker.running = "the test of the supervisor"
    crashed = broker.pid()
    assert crashed is not None
    os.kill(crashed, signal.SIGSEGV)
    wait_until(lambda: broker.crashes and broker.is_running(), what="started again")
    assert broker.pid() != crashed
    assert broker.crashes[0].endswith(" in the test of the supervisor")

    broker.stop()
    time.sleep(1.0)  # four of the watcher's looks (every 0.25 s)
    assert not broker.is_running()
    assert len(broker.crashes) == 1


def test_the_supervisor_sees_each_sighup_once(supervised: SupervisedBroker) -> None:
    """What fails a test that sends the session broker SIGHUP (fixtures.servers)."""
    assert supervised.reloads_since_last_call() == 0
    supervised.reload()
    wait_until(lambda: supervised.reloads_since_last_call() == 1, what="the SIGHUP logged")
    assert supervised.reloads_since_last_call() == 0


def test_a_pair_broker_is_restarted_after_a_test_that_sent_it_sighup(
    pki: PkiLayout, tmp_path: Path
) -> None:
    """What `broker_pair_env` does after each test (fixtures/ha.py)."""
    port, admin_port = free_port(), free_port()
    files = render(run_dir=tmp_path, pki=pki, tls_port=port, admin_port=admin_port)
    broker = BrokerServer(files, port=port, admin_port=admin_port)
    broker.start()
    try:
        since, pid = log_end(files.log), broker.pid()
        assert not restart_if_reloaded(broker, since)  # no SIGHUP: left alone
        assert broker.pid() == pid
        broker.reload()
        wait_until(lambda: logged_after(files.log, since, RELOADING), what="the SIGHUP logged")
        assert restart_if_reloaded(broker, since)
        assert broker.is_running()
        assert broker.pid() != pid
    finally:
        broker.stop()
