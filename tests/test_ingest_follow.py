"""Load-following workers (`ingest.follow`): the load measure, the follower's rules, and,
through the real broker, Redis and PostgreSQL, that joining and leaving the shared
subscription loses and duplicates nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from ingest_harness import ProbeMeter, provision, running_worker, stored_counts, worker_settings
from pydantic import ValidationError
from waiting import async_wait_until

from meterproof.certs.layout import PkiLayout
from meterproof.ingest.follow import (
    FOLLOW_CHANGES,
    Change,
    Follower,
    FollowPolicy,
    LoadMeter,
    LoadReport,
)
from meterproof.ingest.settings import IngestSettings
from meterproof.schemas.signatures import PrivateKey
from meterproof.stack.broker import BrokerServer
from meterproof.stack.redis import RedisServer

POLICY = FollowPolicy(join_busy=0.6, leave_busy=0.3, leave_after_s=30, stale_s=5)


def report(name: str, *, busy: float, at: float = 100.0, follower: bool = False,
           subscribed: bool = True) -> LoadReport:  # fmt: skip
    return LoadReport(name, follower, subscribed, busy, 0.0, at)


def test_the_load_meter_counts_busy_time_and_readings_inside_its_window() -> None:
    now = [0.0]
    meter = LoadMeter(window_s=5.0, clock=lambda: now[0])
    assert meter.sample() == (0.0, 0.0)
    for start in (0.0, 1.0, 2.0, 3.0, 4.0):  # 0.5 s of every second, 100 readings each
        now[0] = start
        meter.busy()
        now[0] = start + 0.5
        meter.free(100)
    now[0] = 5.0
    assert meter.sample() == pytest.approx((0.5, 100.0))
    now[0] = 7.25  # the window is [2.25, 7.25]: 0.25 s of the third span, all of the last two
    assert meter.sample() == pytest.approx((0.25, 60.0))
    meter.busy()  # in flight counts up to now
    now[0] = 8.25
    assert meter.sample() == pytest.approx((1.75 / 5, 40.0))  # 0.25 + 0.5 + 1.0
    now[0] = 60.0
    assert meter.sample() == pytest.approx((1.0, 0.0))  # one transaction has taken 51.75 s
    fresh = LoadMeter(window_s=5.0, clock=lambda: now[0])
    now[0] = 0.0
    fresh.busy()  # in flight from time 0, which is a time like any other
    now[0] = 1.0
    assert fresh.sample() == pytest.approx((0.2, 0.0))


def test_a_follower_joins_a_busy_or_silent_anchor_and_leaves_an_idle_group_only_after_a_while() -> (
    None
):
    me = report("f", busy=0.0, follower=True, subscribed=False)
    f = Follower(POLICY)
    assert f.decide(False, me, [report("a", busy=0.59)], 100.0) is None
    assert f.decide(False, me, [report("a", busy=0.6)], 100.0) is Change.ANCHOR_BUSY
    # no anchor: from 5 s after the follower's first decision (an anchor starting with it
    # may not have reported yet)
    assert f.decide(False, me, [], 104.9) is None
    assert f.decide(False, me, [], 105.0) is Change.NO_ANCHOR
    assert f.decide(False, me, [report("a", busy=0.0, at=99.0)], 105.0) is Change.NO_ANCHOR
    # another follower's report is no anchor's
    assert f.decide(False, me, [report("g", busy=0.9, follower=True)], 105.0) is Change.NO_ANCHOR

    me = report("f", busy=0.1, follower=True)
    idle = [report("a", busy=0.1, at=t) for t in (100.0, 129.0, 130.0, 131.0)]
    assert f.decide(True, me, [idle[0]], 100.0) is None  # idle since 100
    assert f.decide(True, me, [idle[1]], 129.0) is None
    assert f.decide(True, me, [idle[2]], 130.0) is Change.GROUP_IDLE
    # busy again before the time is up: the count starts over
    f = Follower(POLICY)
    assert f.decide(True, me, [report("a", busy=0.1, at=100.0)], 100.0) is None
    assert f.decide(True, me, [report("a", busy=0.25, at=120.0)], 120.0) is None  # 0.35
    assert f.decide(True, me, [report("a", busy=0.1, at=125.0)], 125.0) is None
    assert f.decide(True, me, [report("a", busy=0.1, at=154.0)], 154.0) is None
    assert f.decide(True, me, [report("a", busy=0.1, at=155.0)], 155.0) is Change.GROUP_IDLE
    # never leaves a group without a live anchor
    f = Follower(POLICY)
    for t in (100.0, 200.0):
        assert f.decide(True, me, [report("a", busy=0.0, at=t - 10)], t) is None


def test_following_needs_redis(pki: PkiLayout, broker: BrokerServer) -> None:
    with pytest.raises(ValidationError, match="follow_load needs redis_url"):
        worker_settings(
            pki=pki, port=broker.port, database_url="postgresql://unused", redis_url=None,
            follow_load=True,
        )  # fmt: skip


def _fleet(
    pki: PkiLayout, database_url: str, make_meter_id: Callable[[], str], n: int
) -> dict[str, PrivateKey]:
    return {m: provision(pki, database_url, m) for m in (make_meter_id() for _ in range(n))}


def _anchor_and_follower(
    pki: PkiLayout, broker: BrokerServer, redis: RedisServer, database_url: str,
    tick_s: float, **follower: float,
) -> tuple[IngestSettings, IngestSettings]:  # fmt: skip
    """Two workers on one new share group; the second follows, with `follower` settings."""
    common = {"pki": pki, "port": broker.port, "database_url": database_url,
              "redis_url": redis.url, "follow_tick_s": tick_s}  # fmt: skip
    anchor = worker_settings(**common)
    return anchor, worker_settings(
        **common,
        share_group=anchor.share_group,
        follow_load=True,
        **follower,
    )


def test_an_idle_anchor_keeps_the_follower_out_and_a_missing_one_brings_it_in(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    make_meter_id: Callable[[], str],
) -> None:
    keys = _fleet(pki, database_url, make_meter_id, 2)
    anchor, follower = _anchor_and_follower(
        pki, broker, redis_server, database_url, 0.1, follow_leave_after_s=0.3
    )
    t0 = int(time.time() * 1000) - 3_600_000
    no_anchor = FOLLOW_CHANGES.labels(reason=Change.NO_ANCHOR.value)

    async def scenario() -> tuple[int, int, int]:
        meters = [ProbeMeter(m, k, pki, broker.port) for m, k in keys.items()]
        async with running_worker(follower) as f:
            async with running_worker(anchor) as a:
                await asyncio.sleep(1.0)  # the anchor reports; the follower left if it joined
                joined_before = f.committed
                for m in meters:
                    await m.connect()
                for seq in range(1, 31):
                    for m in meters:
                        m.publish(m.reading(seq, ts=t0 + seq * 5_000, imp=seq, exp=seq))
                for m in meters:
                    await m.wait_receipts(30, within_s=30)
                by_anchor = a.committed
            joins = no_anchor._value.get()
            await async_wait_until(lambda: no_anchor._value.get() > joins, what="joined")
            for seq in range(31, 41):  # the anchor's session is still subscribed: it gets half
                for m in meters:
                    m.publish(m.reading(seq, ts=t0 + seq * 5_000, imp=seq, exp=seq))
            await async_wait_until(lambda: f.committed > joined_before, what="follower stores")
            by_follower = f.committed - joined_before
        async with running_worker(anchor):  # back: it takes what its session kept
            for m in meters:
                await m.wait_receipts(40, within_s=30)
                await m.close()
        return joined_before, by_anchor, by_follower

    joined_before, by_anchor, by_follower = asyncio.run(scenario())
    assert joined_before == 0
    assert by_anchor == 60  # every reading while the anchor was up and idle
    assert 0 < by_follower < 20
    counts = stored_counts(database_url, list(keys))
    assert len(counts) == 80
    assert set(counts.values()) == {1}


def test_a_follower_joining_and_leaving_over_and_over_loses_and_duplicates_nothing(
    pki: PkiLayout,
    broker: BrokerServer,
    redis_server: RedisServer,
    database_url: str,
    make_meter_id: Callable[[], str],
) -> None:
    """Thresholds that always say "join" and always say "leave": the follower changes
    every few ticks while 4 meters send 400 readings."""
    keys = _fleet(pki, database_url, make_meter_id, 4)
    anchor, follower = _anchor_and_follower(
        pki, broker, redis_server, database_url, 0.05,
        follow_join_busy=0.0, follow_leave_busy=100.0, follow_leave_after_s=0.1,
    )  # fmt: skip
    t0 = int(time.time() * 1000) - 3_600_000
    changes = [
        FOLLOW_CHANGES.labels(reason=c.value) for c in (Change.ANCHOR_BUSY, Change.GROUP_IDLE)
    ]
    before = [c._value.get() for c in changes]

    async def scenario() -> tuple[int, int]:
        meters = [ProbeMeter(m, k, pki, broker.port) for m, k in keys.items()]
        async with running_worker(anchor) as a, running_worker(follower) as f:
            for m in meters:
                await m.connect()
            for seq in range(1, 101):
                for m in meters:
                    m.publish(m.reading(seq, ts=t0 + seq * 5_000, imp=seq, exp=seq))
                await asyncio.sleep(0.02)
            for m in meters:
                await m.wait_receipts(100, within_s=60)
                await m.close()
            return a.committed, f.committed

    by_anchor, by_follower = asyncio.run(scenario())
    joined, left = (c._value.get() - b for c, b in zip(changes, before, strict=True))
    assert joined >= 3, (joined, left)
    assert left >= 3, (joined, left)
    assert by_follower > 0
    assert by_anchor > 0
    assert by_anchor + by_follower == 400
    counts = stored_counts(database_url, list(keys))
    assert len(counts) == 400
    assert set(counts.values()) == {1}
