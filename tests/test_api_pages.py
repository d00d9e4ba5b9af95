"""History pages (api/pages.py) with and without their CSV, on real PostgreSQL: a page
rendered without CSV serves JSON reads only, and CSV reads of its quarters fall back to
rows; rendered with CSV, a page serves the same bytes a row-by-row CSV read gives. And the
renderer on a server gone silent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import psycopg
import pytest
from bridge_harness import T0, make_fleet, query
from ingest_harness import SilentProxy

from meterproof.api import pages, reads
from meterproof.db.silence import SILENT
from meterproof.stack.postgres import PostgresServer

QUARTERS = 4


async def _render_and_read(
    database_url: str, meter_id: str, *, csv: bool
) -> dict[str, bytes | None]:
    """Queue every quarter, render them with or without CSV, then read the whole range
    through pages both ways and, as CSV, row by row."""
    span = reads.Span(meter_id, T0, T0 + QUARTERS * pages.QUARTER_MS, None, 1_000)
    async with reads.ReadPool(database_url, answer_within_s=30, min_size=1, max_size=1) as pool:
        async with pool.connection() as conn:
            await conn.execute(
                "INSERT INTO history_dirty SELECT meter_id, bucket FROM meter_quarters"
                " ON CONFLICT DO NOTHING"
            )
        renderer = pages.Renderer(pool, interval_s=1, grace_s=0, batch=1_000, csv=csv)
        while await renderer.render_once():
            pass
        rows = await reads.history(pool, span, csv=True)
        return {
            "json": await pages.whole_range(pool, span),
            "csv": await pages.whole_range(pool, span, csv=True),
            "rows_csv": reads.csv_lines(rows.lines),
        }


def test_a_page_serves_csv_only_when_rendered_with_it(
    database_url: str, make_meter_id: Callable[[], str]
) -> None:
    fleet, (meter_id,) = make_fleet(database_url, make_meter_id, [None])
    minute = 60_000
    fleet.store([(meter_id, k + 1, T0 + k * 5 * minute + 1_000, 10 * k, k)
                 for k in range(QUARTERS * 3)])  # fmt: skip

    without = asyncio.run(_render_and_read(database_url, meter_id, csv=False))
    assert query(database_url, "SELECT count(*), count(csv) FROM history_pages") == [(QUARTERS, 0)]
    assert without["json"] is not None
    assert without["csv"] is None  # no page has CSV: the route reads rows

    with_csv = asyncio.run(_render_and_read(database_url, meter_id, csv=True))
    assert query(database_url, "SELECT count(csv) FROM history_pages") == [(QUARTERS,)]
    assert with_csv["json"] == without["json"]
    assert with_csv["csv"] == with_csv["rows_csv"]
    assert with_csv["csv"] is not None
    assert with_csv["csv"].count(b"\n") == QUARTERS * 3 - 1


def test_pages_are_compressed_with_lz4(database_url: str) -> None:
    """Migration 0014: lz4, not pglz, for both renderings (docs/api.md, "History pages")."""
    assert query(
        database_url,
        "SELECT attname, attcompression FROM pg_attribute"
        " WHERE attrelid = 'history_pages'::regclass AND attname IN ('body', 'csv')"
        " ORDER BY attname",
    ) == [("body", "l"), ("csv", "l")]


def test_a_render_on_a_server_gone_silent_is_cut_and_the_next_one_runs(
    postgres: PostgresServer, database_url: str
) -> None:
    """The pool's connections stop being answered and stay open (a primary's machine
    paused; new connections reach a new primary): a render waited on its socket for good,
    and queued quarters stayed unrendered. It fails after `answer_within_s`, and the pool
    is drained, so the next render runs on a new connection."""
    proxy = SilentProxy(postgres.port)
    cuts = SILENT.labels(wait="history_pages")

    async def scenario() -> tuple[float, int]:
        async with (
            proxy.serving(database_url) as via,
            reads.ReadPool(via, answer_within_s=1, min_size=2, max_size=2) as pool,
        ):
            await pool.wait()
            renderer = pages.Renderer(pool, interval_s=1, grace_s=0, batch=10)
            assert await renderer.render_once() == 0
            proxy.silence()
            started = time.monotonic()
            with pytest.raises(psycopg.OperationalError):
                await asyncio.wait_for(renderer.render_once(), 20)
            failed_s = time.monotonic() - started
            return failed_s, await asyncio.wait_for(renderer.render_once(), 20)

    before = cuts._value.get()
    failed_s, picked = asyncio.run(scenario())
    assert 0.5 < failed_s < 5, failed_s
    assert picked == 0
    assert cuts._value.get() - before == 1
