"""Workers that follow the load: a follower takes a share of the readings only while the
group needs it.

Why: each worker's transactions carry a fixed cost, and a shared subscription gives every
subscribed worker its share of a trickle, so two workers at 1,000 readings/s start twice
the transactions of one and cost 31-34% more server CPU per reading; at the highest rates
one worker cannot keep up (docs/scaling.md, "One worker against two, live").

How: every worker reports its load to Redis once a tick: the share of the last few
seconds in which its store had a transaction in flight (`busy`), and its readings per
second. An *anchor* (a worker with `follow_load` off) always stays subscribed. A
*follower* subscribes when an anchor is busy beyond `follow_join_busy`, or when no anchor
has reported lately (it is down, or Redis is), and unsubscribes once the subscribed
workers' busy shares add up to less than `follow_leave_busy` for `follow_leave_after_s`.

Leaving loses nothing: the follower stays connected, and what the broker had already
queued for its session still arrives and is handled and acknowledged as usual; new
readings go to the workers still subscribed (measured on Mosquitto, docs/scaling.md,
"Load-following workers"). A follower that dies while subscribed leaves its persistent
session subscribed, as any worker does, and its supervisor restarts it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Final

import redis.asyncio as aioredis
import structlog
from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError

from meterproof.ingest.telemetry import DEPENDENCY_ERRORS

log = structlog.get_logger("ingest.follow")

SUBSCRIBED = Gauge(
    "meterproof_ingest_subscribed", "1 while this worker takes a share of the readings"
)
STORE_BUSY = Gauge(
    "meterproof_ingest_store_busy_ratio",
    "Share of the last seconds in which the store had a transaction in flight",
)


class Change(StrEnum):
    """Why a follower joined or left; the label of `FOLLOW_CHANGES`."""

    ANCHOR_BUSY = "anchor_busy"
    NO_ANCHOR = "no_anchor"
    GROUP_IDLE = "group_idle"


FOLLOW_CHANGES = Counter(
    "meterproof_ingest_follow_changes_total",
    "A follower joined (anchor_busy, no_anchor) or left (group_idle) the shared subscription",
    ["reason"],
)
for _change in Change:
    FOLLOW_CHANGES.labels(reason=_change.value)

#: A report older than this many ticks is of a worker that stopped reporting.
STALE_TICKS: Final = 5


@dataclass(frozen=True, slots=True)
class LoadReport:
    identity: str
    follower: bool
    subscribed: bool
    busy: float  # share of the window with a transaction in flight
    rate: float  # readings per second taken into transactions over the window
    at: float  # unix seconds

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: str | bytes) -> LoadReport:
        return cls(**json.loads(raw))


class LoadMeter:
    """The store's busy share and readings per second over the last `window_s`."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._window_s = window_s
        self._busy_since: float | None = None
        self._spans: deque[tuple[float, float, int]] = deque()  # (start, end, readings)

    def busy(self) -> None:
        self._busy_since = self._clock()

    def free(self, readings: int) -> None:
        if self._busy_since is not None:
            self._spans.append((self._busy_since, self._clock(), readings))
            self._busy_since = None

    def sample(self) -> tuple[float, float]:
        """(busy share, readings per second) over the window ending now; a transaction
        still in flight counts up to now."""
        now = self._clock()
        start = now - self._window_s
        while self._spans and self._spans[0][1] <= start:
            self._spans.popleft()
        flight = [] if self._busy_since is None else [(self._busy_since, now, 0)]
        spans = [*self._spans, *flight]
        busy = sum(min(end, now) - max(begin, start) for begin, end, _ in spans)
        readings = sum(n for _, end, n in spans if end > start)
        return min(1.0, busy / self._window_s), readings / self._window_s


@dataclass(frozen=True, slots=True)
class FollowPolicy:
    join_busy: float
    leave_busy: float
    leave_after_s: float
    stale_s: float


class Follower:
    """The decision of one follower, tick by tick (no I/O, so each rule is tested alone)."""

    def __init__(self, policy: FollowPolicy) -> None:
        self._policy = policy
        self._idle_since: float | None = None
        self._started: float | None = None

    def decide(
        self, subscribed: bool, me: LoadReport, others: Iterable[LoadReport], now: float
    ) -> Change | None:
        """The change to make now, if any. An anchor that starts with this follower may
        not have reported yet: missing it counts only from `stale_s` after the start."""
        self._started = self._started if self._started is not None else now
        fresh = [r for r in others if now - r.at <= self._policy.stale_s]
        anchors = [r for r in fresh if not r.follower]
        if not subscribed:
            if not anchors:
                silent = now - self._started >= self._policy.stale_s
                return Change.NO_ANCHOR if silent else None
            if max(r.busy for r in anchors) >= self._policy.join_busy:
                return Change.ANCHOR_BUSY
            return None
        group = me.busy + sum(r.busy for r in fresh if r.subscribed)
        if not anchors or group >= self._policy.leave_busy:
            self._idle_since = None
            return None
        self._idle_since = self._idle_since if self._idle_since is not None else now
        if now - self._idle_since < self._policy.leave_after_s:
            return None
        self._idle_since = None
        return Change.GROUP_IDLE


def reports_key(share_group: str) -> str:
    """One Redis hash per group of workers, named by a digest: the group name is a secret."""
    return "meterproof:ingest:load:" + hashlib.sha256(share_group.encode()).hexdigest()[:16]


class LoadBoard:
    """The workers' load reports in Redis: write one's own, read the others'."""

    def __init__(self, redis_url: str, share_group: str, *, stale_s: float) -> None:
        self._redis = aioredis.Redis.from_url(redis_url, socket_timeout=2.0)
        self._key = reports_key(share_group)
        self._forget_s = 10 * stale_s

    async def exchange(self, mine: LoadReport) -> list[LoadReport] | None:
        """Write `mine`, read the others' (forgetting long-silent ones); None when Redis
        failed (counted and logged: a follower then subscribes)."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hset(self._key, mine.identity, mine.encode())
                pipe.expire(self._key, int(self._forget_s) + 1)
                pipe.hgetall(self._key)
                *_, raw = await pipe.execute()
            reports = []
            for name, value in raw.items():
                if name == mine.identity.encode():
                    continue
                try:
                    reports.append(LoadReport.decode(value))
                except (ValueError, TypeError):
                    log.warning("load_report_unreadable", worker=name.decode(errors="replace"))
            gone = [r.identity for r in reports if mine.at - r.at > self._forget_s]
            if gone:
                await self._redis.hdel(self._key, *gone)
        except (RedisError, OSError) as exc:
            DEPENDENCY_ERRORS.labels(dependency="redis").inc()
            log.warning("load_board_unavailable", error=str(exc))
            return None
        return [r for r in reports if r.identity not in gone]

    async def close(self) -> None:
        await self._redis.aclose()
