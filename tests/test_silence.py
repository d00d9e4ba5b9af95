"""`meterproof.db.silence` off the event loop: the bridge, the evm journal and the API's
synchronous routes wait on PostgreSQL from threads, and the API's integrator lookup
connects for each request. A server gone silent (a primary's machine paused or cut off)
must fail each of them within the bound, as a lost connection, not hold it for good."""

from __future__ import annotations

import asyncio
import threading
import time

import psycopg
import pytest
from ingest_harness import SilentProxy

from meterproof.api.auth import _integrator_secret
from meterproof.db.silence import SILENT, connected, deadline
from meterproof.errors import UnavailableError
from meterproof.stack.postgres import PostgresServer

#: The test's own limit on a wait the code under test should end within seconds: past it
#: the wait is taken as one that would never end.
_FOREVER_S = 20.0


def test_a_timer_thread_cuts_a_wait_that_outlives_it_and_nothing_after_the_block() -> None:
    cuts: list[float] = []
    with deadline(within_s=0.2, cut_off=lambda: cuts.append(time.monotonic()), wait="t") as d:
        time.sleep(0.5)
    assert (d.fired, len(cuts)) == (True, 1)
    with deadline(within_s=0.05, cut_off=lambda: cuts.append(time.monotonic()), wait="t") as d:
        pass
    time.sleep(0.3)
    assert (d.fired, len(cuts)) == (False, 1)
    assert not [t for t in threading.enumerate() if isinstance(t, threading.Timer)]


def test_a_connection_for_one_piece_of_work_fails_when_its_server_goes_silent(
    postgres: PostgresServer, database_url: str
) -> None:
    proxy = SilentProxy(postgres.port)
    cuts = SILENT.labels(wait="test_work")

    def work(via: str, silenced: threading.Event) -> float:
        with connected(via, within_s=1, wait="test_work") as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            silenced.wait()
            started = time.monotonic()
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 2")
            return time.monotonic() - started

    async def scenario() -> float:
        async with proxy.serving(database_url) as via:
            silenced = threading.Event()
            job = asyncio.ensure_future(asyncio.to_thread(work, via, silenced))
            await asyncio.sleep(0.3)
            proxy.silence()
            silenced.set()
            return await asyncio.wait_for(job, _FOREVER_S)

    before = cuts._value.get()
    took_s = asyncio.run(scenario())
    assert cuts._value.get() - before == 1
    assert 0.5 < took_s < 5, took_s


def test_a_connect_to_a_server_that_never_answers_gives_up(
    postgres: PostgresServer, database_url: str
) -> None:
    """Accepted, the startup never answered: libpq's connect_timeout (at least 2 s) ends it,
    for the journal and the API's routes (`connected`) and the integrator lookup alike."""
    proxy = SilentProxy(postgres.port)

    def connect(via: str) -> None:
        with connected(via, within_s=1, wait="test_connect"):
            pass

    async def scenario() -> tuple[float, float]:
        async with proxy.serving(database_url) as via:
            proxy.silence(new_links=True)
            started = time.monotonic()
            with pytest.raises(psycopg.OperationalError):
                await asyncio.wait_for(asyncio.to_thread(connect, via), _FOREVER_S)
            synchronous_s = time.monotonic() - started
            started = time.monotonic()
            with pytest.raises(UnavailableError):
                await asyncio.wait_for(_integrator_secret(via, "someone", within_s=1), _FOREVER_S)
            return synchronous_s, time.monotonic() - started

    synchronous_s, lookup_s = asyncio.run(scenario())
    assert 1.5 < synchronous_s < 6, synchronous_s
    assert 1.5 < lookup_s < 6, lookup_s
