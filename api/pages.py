"""History pages: a meter's readings of one closed quarter, rendered once as the API
serves them, so a read of a whole range joins ~96 pages per meter-day instead of
rendering 17,280 rows (~33 ms of PostgreSQL's time per meter-day; docs/api.md, "History
pages").

Rendering. Every stored batch queues the quarters it touched (`history_dirty`, filled by
a trigger of migration 0013). `Renderer` takes queued quarters that closed at least
`api_pages_grace_s` ago, oldest first, renders each from `readings` with the row of
`reads.JSON_ROW` (finished as `reads.finish` finishes rows, once, there) and, unless
`api_pages_csv` is off, the lines of `reads.CSV_ROW`, and replaces its page, in one
statement that also takes them off the queue; `FOR UPDATE SKIP LOCKED` lets several API
processes share the queue. Both are compressed with lz4 (migration 0014).

Reading. A page is used only while its `readings` equals the quarter's count in
`meter_quarters`, which the rollup trigger keeps in the transaction of every stored
reading: a reading that arrives after the render makes the page stale at once, and until
it is rendered again that quarter is read row by row. So a page never hides a reading or
shows one twice. A read goes through pages only when the whole range fits in one answer
(the quarters' counts, an upper bound, below `limit`); otherwise `reads.history` pages
through rows with its cursor. Quarters at the range's edges, the open quarter and stale
ones are read as rows, from the same index range `reads.history` uses; so are a CSV
read's quarters whose page has no CSV.

Retention (db/retention.py) deletes the pages of the quarters it removes readings from,
but a render that started before that delete committed may write one after it. So a page
is also used only when its quarter starts after the meter's latest retired reading (its
watermark): older quarters are read as rows.

A reading whose transaction commits while its quarter is being rendered may be left out
of the page with the quarter already off the queue; the count makes that page stale, so
that quarter is read as rows (correct, slower) until a later reading queues it again.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from typing import Final, LiteralString

import psycopg
import structlog
from prometheus_client import Counter

from meterproof.api import reads
from meterproof.backoff import Backoff

log = structlog.get_logger("api.pages")

RENDERED = Counter("meterproof_api_history_pages_rendered_total", "history pages rendered")
RENDER_FAILURES = Counter(
    "meterproof_api_history_page_failures_total", "history page renders that failed", ["reason"]
)
SERVED = Counter(
    "meterproof_api_history_reads_total", "history reads, by how they were served", ["way"]
)

QUARTER_MS: Final = 900_000


def _render(csv: LiteralString) -> LiteralString:
    """Queued quarters that started more than `closed_s` ago, oldest first, rendered and
    taken off the queue in one statement; `csv` is the page's CSV (or NULL). A quarter
    without readings (all retired) gets no page. The four replace() make `sig` base64url
    over the whole JSON body: 4.4 us per reading in all, against 15.8 with one translate()
    (docs/api.md, "History pages")."""
    return f"""
WITH picked AS (
    DELETE FROM history_dirty WHERE (meter_id, bucket) IN (
        SELECT meter_id, bucket FROM history_dirty
        WHERE bucket < now() - %(closed_s)s * interval '1 second'
        ORDER BY bucket LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
    RETURNING meter_id, bucket
), written AS (
    INSERT INTO history_pages AS p (meter_id, bucket, readings, body, csv)
    SELECT k.meter_id, k.bucket, r.n, r.body, r.csv FROM picked k
    CROSS JOIN LATERAL (
        SELECT count(*) AS n,
               replace(replace(replace(replace(string_agg({reads.JSON_ROW}, ',' ORDER BY ts, seq),
                       E'\\n', ''), '=', ''), '+', '-'), '/', '_') AS body,
               {csv} AS csv
        FROM readings
        WHERE meter_id = k.meter_id AND ts >= k.bucket AND ts < k.bucket + interval '15 minutes'
    ) r
    WHERE r.n > 0
    ON CONFLICT (meter_id, bucket) DO UPDATE
        SET readings = EXCLUDED.readings, body = EXCLUDED.body, csv = EXCLUDED.csv
    RETURNING 1
)
SELECT (SELECT count(*) FROM picked), (SELECT count(*) FROM written)
"""  # noqa: S608 - built from this package's constants only


#: The renderer's statement, with the CSV of each page or without (`api_pages_csv`).
_RENDER: Final = {
    True: _render(f"string_agg({reads.CSV_ROW}, E'\\n' ORDER BY ts, seq)"),
    False: _render("NULL::text"),
}
_FROM: Final = reads.MS.replace("%s", "%(from)s")
_TO: Final = reads.MS.replace("%s", "%(to)s")
#: The quarters of [from, to) with their counts; a fresh page's JSON (or CSV) only when
#: the whole range fits in one answer. Fresh: its count is the quarter's, and its quarter
#: starts after the meter's latest retired reading (`reading_watermarks`, written before
#: retention deletes anything): retention leaves the counts, so a page rendered from
#: readings it deleted meanwhile would still match.
_QUARTERS: Final[LiteralString] = """
SELECT (date_part('epoch', q.bucket) * 1000)::bigint, q.readings,
       CASE WHEN sum(q.readings) OVER () < %(limit)s THEN convert_to(p.{column}, 'UTF8') END
FROM meter_quarters q
LEFT JOIN reading_watermarks w ON w.meter_id = q.meter_id
LEFT JOIN history_pages p
       ON p.meter_id = q.meter_id AND p.bucket = q.bucket AND p.readings = q.readings
      AND (w.ts IS NULL OR p.bucket > w.ts)
WHERE q.meter_id = %(meter)s
  AND q.bucket >= date_bin(interval '15 minutes', {from_}, timestamptz '2000-01-01 00:00:00+00')
  AND q.bucket < {to}
ORDER BY q.bucket
"""
#: The rows of the gaps between pages (disjoint, ascending), after the cursor.
_GAPS: Final[LiteralString] = f"""
SELECT x.ts_ms, x.line FROM unnest(%(lo)s::bigint[], %(hi)s::bigint[]) AS g (lo, hi)
CROSS JOIN LATERAL (
    SELECT {reads.TS_MS} AS ts_ms, seq, {{row}} AS line FROM readings
    WHERE meter_id = %(meter)s
      AND ts >= {reads.MS.replace("%s", "g.lo")} AND ts < {reads.MS.replace("%s", "g.hi")}
      AND (ts, seq) > ({reads.MS.replace("%s", "%(after_ts)s")}, %(after_seq)s::numeric)
) x
ORDER BY x.ts_ms, x.seq
"""  # noqa: S608 - built from this package's constants only
#: What a whole-range read asks, per format: (the quarters' query, the gaps' query).
_READS: Final = {
    False: (_QUARTERS.format(column="body", from_=_FROM, to=_TO), _GAPS.format(row=reads.JSON_ROW)),
    True: (_QUARTERS.format(column="csv", from_=_FROM, to=_TO), _GAPS.format(row=reads.CSV_ROW)),
}


async def whole_range(pool: reads.ReadPool, span: reads.Span, *, csv: bool = False) -> bytes | None:
    """Every reading of the span in (ts, seq) order: the JSON objects of `reads.finish`,
    comma-joined, or with `csv` the CSV lines of `reads.csv_lines`, newline-joined. None
    when the range may hold `span.limit` readings or more, or no page serves it: then
    `reads.history` reads it."""
    from_ms, to_ms, limit = span.from_ms, span.to_ms, span.limit
    quarters_sql, gaps_sql = _READS[csv]
    quarters = await reads.query(
        pool, quarters_sql, {"meter": span.meter_id, "from": from_ms, "to": to_ms, "limit": limit},
        binary=True,
    )  # fmt: skip
    after_ts, after_seq = span.after_key
    pages = [
        (int(start), int(count), body)
        for start, count, body in quarters
        if body is not None and start >= from_ms and start + QUARTER_MS <= to_ms
        and start > after_ts
    ]  # fmt: skip
    if not pages:
        return None
    lo, hi, cursor = [], [], from_ms
    for start, _, _ in pages:
        if start > cursor:
            lo.append(cursor)
            hi.append(start)
        cursor = start + QUARTER_MS
    if cursor < to_ms:
        lo.append(cursor)
        hi.append(to_ms)
    rows = await reads.query(
        pool,
        gaps_sql,
        {"lo": lo, "hi": hi, "meter": span.meter_id, "after_ts": after_ts, "after_seq": after_seq},
    )
    if len(rows) + sum(count for _, count, _ in pages) >= limit:
        return None  # the counts were short (readings without a log row)
    times = [int(row[0]) for row in rows]
    finish, separator = (reads.csv_lines, b"\n") if csv else (reads.finish, b",")
    out: list[bytes] = []
    i = 0
    for start, _, body in [*pages, (to_ms, 0, b"")]:  # the rows before each page, the page
        j = bisect.bisect_left(times, start, lo=i)
        if j > i:
            out.append(finish([row[1] for row in rows[i:j]]))
        if body:
            out.append(body)
        i = j
    return separator.join(out)


class Renderer:
    """Renders queued quarters into pages until `stop`: batches of `batch` while there
    is a backlog, then one pass every `interval_s`. A database failure is logged, counted
    and retried with backoff; the queue keeps the work."""

    def __init__(
        self,
        pool: reads.ReadPool,
        *,
        interval_s: float,
        grace_s: float,
        batch: int,
        csv: bool = True,
    ) -> None:
        self._render = _RENDER[csv]
        self._pool = pool
        self._interval_s = interval_s
        self._grace_s = grace_s
        self._batch = batch

    async def render_once(self) -> int:
        """One batch of closed quarters; returns how many left the queue."""
        async with self._pool.answering(wait="history_pages") as conn:
            cur = await conn.execute(
                self._render, {"closed_s": QUARTER_MS / 1000 + self._grace_s, "limit": self._batch}
            )
            row = await cur.fetchone()
        picked, written = (int(row[0]), int(row[1])) if row else (0, 0)
        RENDERED.inc(written)
        return picked

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff(1.0, 60.0)
        while not stop.is_set():
            try:
                picked = await self.render_once()
                backoff.reset()
            except psycopg.Error as exc:
                RENDER_FAILURES.labels(reason=type(exc).__name__).inc()
                log.warning("history_pages_failed", error=str(exc))
                picked, delay = 0, backoff.next_s()
            else:
                delay = 0.0 if picked >= self._batch else self._interval_s
            if picked:
                log.info("history_pages_rendered", quarters=picked)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
