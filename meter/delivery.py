"""When each pending reading goes out: pure, the caller passes the clock, so the retry rules
are tested with plain numbers.

A reading moves queued -> in flight (handed to MQTT, no PUBACK yet) -> acknowledged (its
receipt timer runs) -> gone (receipt). In-flight messages are the MQTT client's to resend
after a reconnect; an acknowledged reading whose receipt does not arrive in time is
queued again, since a broker killed with -9 may have lost it, and the ingest side
deduplicates. The timeout doubles per attempt so that a fleet whose workers are down
does not republish its whole backlog every few seconds.

A PUBACK saying "no matching subscribers" (MQTT 5 reason 16) means the broker dropped the
reading at once: no worker's subscription exists, as happens for a moment after a broker
restart, because Mosquitto 2.0 does not restore shared subscriptions from its persistence
file. Waiting for a receipt then is waiting for nothing, so such a reading is retried after
`unrouted_retry` instead, doubling per attempt up to `republish_after`.
"""

from __future__ import annotations

import heapq


class TokenBucket:
    """On average at most `rate` takes per second, at most `burst` at once."""

    def __init__(self, *, rate: float, burst: int) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, not {rate}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, not {burst}")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp: float | None = None

    def take(self, now: float) -> bool:
        if self._stamp is not None:
            elapsed = max(0.0, now - self._stamp)
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class Delivery:
    def __init__(
        self,
        *,
        republish_after: float,
        max_republish_after: float,
        max_inflight: int,
        bucket: TokenBucket,
        unrouted_retry: float = 1.0,
    ) -> None:
        if republish_after <= 0:
            raise ValueError(f"republish_after must be positive, not {republish_after}")
        if max_republish_after < republish_after:
            raise ValueError("max_republish_after must be at least republish_after")
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, not {max_inflight}")
        if not 0 < unrouted_retry <= republish_after:
            raise ValueError("need 0 < unrouted_retry <= republish_after")
        self.republish_after = republish_after
        self.unrouted_retry = unrouted_retry
        self.max_republish_after = max_republish_after
        self.max_inflight = max_inflight
        self.bucket = bucket
        self._heap: list[int] = []
        self._queued: set[int] = set()
        self._in_flight: set[int] = set()
        self._deadlines: dict[int, float] = {}
        self._attempts: dict[int, int] = {}

    @property
    def queued(self) -> int:
        return len(self._queued)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def acknowledged(self) -> int:
        return len(self._deadlines)

    def attempts(self, seq: int) -> int:
        return self._attempts.get(seq, 0)

    def add(self, seq: int) -> None:
        """Queue a reading for its first send (new, or found in the outbox at start)."""
        if seq in self._attempts:
            return
        self._attempts[seq] = 0
        self._push(seq)

    def take(self, now: float) -> list[int]:
        """The seqs to publish now, oldest first, within the in-flight and rate bounds."""
        out: list[int] = []
        while self._heap and len(self._in_flight) < self.max_inflight:
            seq = self._heap[0]
            if seq not in self._queued:  # settled while queued
                heapq.heappop(self._heap)
                continue
            if not self.bucket.take(now):
                break
            heapq.heappop(self._heap)
            self._queued.discard(seq)
            self._in_flight.add(seq)
            self._attempts[seq] += 1
            out.append(seq)
        return out

    def acked(self, seq: int, now: float, *, routed: bool = True) -> None:
        """PUBACK: the broker has it; start waiting for the receipt. `routed=False` (reason
        16, no matching subscribers): the broker dropped it, so retry soon."""
        if seq not in self._in_flight:
            return
        self._in_flight.discard(seq)
        attempt = max(1, self._attempts[seq])
        if routed:
            wait = min(self.republish_after * 2 ** (attempt - 1), self.max_republish_after)
        else:
            wait = min(self.unrouted_retry * 2 ** (attempt - 1), self.republish_after)
        self._deadlines[seq] = now + wait

    def settled(self, seq: int) -> None:
        """Receipt: forget the reading wherever it is."""
        self._attempts.pop(seq, None)
        self._queued.discard(seq)
        self._in_flight.discard(seq)
        self._deadlines.pop(seq, None)

    def expire(self, now: float) -> list[int]:
        """Queue again every acknowledged reading whose receipt is overdue."""
        overdue = sorted(seq for seq, deadline in self._deadlines.items() if deadline <= now)
        for seq in overdue:
            del self._deadlines[seq]
            self._push(seq)
        return overdue

    def _push(self, seq: int) -> None:
        self._queued.add(seq)
        heapq.heappush(self._heap, seq)
