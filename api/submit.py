"""HTTP submissions through the ingest worker itself, not beside it.

`HttpSource` is an `ingest.source.Source` whose deliveries are HTTP request bodies,
published as `meters/{id}/readings` by the meter the client certificate names. The API
runs an `ingest.worker.Worker` on it, so a submitted reading is decoded, verified,
deduplicated, judged and stored by exactly the code that serves MQTT, with the same
reason codes, log lines and metrics. The worker publishes a receipt only after the batch's
commit; the source hands it to the waiting request, which answers with it.

The worker publishes each meter's receipts in arrival order (one announcement at a time,
outcomes in batch order), so the receipts of one meter resolve that meter's waiting
requests first in, first out. A request that timed out keeps its place: its receipt is
still consumed, then dropped.

What waits for a receipt is bounded (`max_pending`, `API_SUBMIT_MAX_PENDING`): the worker's
queue has no bound of its own (on MQTT the broker's receive maximum bounds it), so past the
bound a submission is refused before it reaches the worker, 503 `overloaded` with
Retry-After, logged and counted like every refusal; nothing of it was stored.

Seed-003 provider readings travel the same way on `providers/{meter}/readings`
(`schemas.provider.topic`); the worker's decode stage knows that topic, and their receipts
come back on the meter's receipts topic, in the same per-meter order.

What else the worker announces after the commit (the verified copy on
`verified/{id}/readings`, the integrators' consented copies) goes to the broker through
the API's own connection (api/republish.py), exactly as an MQTT worker publishes it.
Receipts are not forwarded: the submitter gets its receipt in the HTTP answer.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from typing import Final

import structlog

from meterproof.api.errors import ApiError
from meterproof.api.republish import Republisher
from meterproof.ingest.records import Message
from meterproof.ingest.source import Delivery, Handler
from meterproof.schemas import topics
from meterproof.schemas.reading import Receipt
from meterproof.schemas.timestamps import wall_ms

log = structlog.get_logger("api.submit")

_RECEIPTS_PREFIX: Final = "meters/"
_RECEIPTS_SUFFIX: Final = "/receipts"


#: Seconds a submission refused `overloaded` is told to wait: a batch commits in less.
_RETRY_AFTER_S: Final = 1


class HttpSource:
    def __init__(
        self, republisher: Republisher | None = None, *, max_pending: int = 10_000
    ) -> None:
        """Without a `republisher`, announcements other than receipts are dropped (the
        API then has no broker identity: `api_mqtt_identity` unset). At most
        `max_pending` readings wait for their receipt at once."""
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self._republisher = republisher
        self._deliver: Handler | None = None
        self._waiting: dict[str, deque[asyncio.Future[bytes]]] = defaultdict(deque)
        self._max_pending = max_pending
        self._pending = 0

    @property
    def pending(self) -> int:
        """Readings delivered to the worker whose receipt has not come back yet."""
        return self._pending

    @property
    def connected(self) -> bool:
        return self._deliver is not None

    @property
    def refused(self) -> int | None:
        """Requests are no subscription: nothing to refuse."""
        return None

    def subscribe(self, on: bool) -> None:
        """Requests are no shared subscription: nothing to join or leave."""

    async def start(self, deliver: Handler) -> None:
        self._deliver = deliver

    async def stop(self) -> None:
        """Requests still waiting get 503: their readings were not committed."""
        self._deliver = None
        for queue in self._waiting.values():
            for future in queue:
                if not future.done():
                    future.set_exception(
                        ApiError(503, "unavailable", "the server stopped before the commit")
                    )
        self._waiting.clear()
        self._pending = 0

    def ack(self, deliveries: Iterable[Delivery]) -> int:
        """Nothing to acknowledge: the request is answered when its receipt arrives."""
        return 0

    async def publish_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        announced: list[tuple[str, bytes]] = []
        for topic, body in items:
            if not (topic.startswith(_RECEIPTS_PREFIX) and topic.endswith(_RECEIPTS_SUFFIX)):
                announced.append((topic, body))
                continue
            meter_id = topic[len(_RECEIPTS_PREFIX) : -len(_RECEIPTS_SUFFIX)]
            queue = self._waiting.get(meter_id)
            if not queue:
                log.error("receipt_without_request", meter_id=meter_id)
                continue
            future = queue.popleft()
            self._pending -= 1
            if not queue:
                del self._waiting[meter_id]
            if not future.done():
                future.set_result(body)
        if self._republisher is not None:
            self._republisher.offer(announced)

    def submit(
        self, meter_id: str, payloads: Sequence[bytes], *, topic: str | None = None
    ) -> list[asyncio.Future[bytes]]:
        """Deliver `payloads` as `meter_id` published them (or on `topic`, whose receipts
        are the meter's: a provider's); each future is its receipt. 503 `overloaded`, with
        nothing delivered, when they would take more than `max_pending` places."""
        if self._deliver is None:
            raise ApiError(503, "unavailable", "the submission pipeline is not running")
        if self._pending + len(payloads) > self._max_pending:
            raise ApiError(
                503, "overloaded",
                f"{self._pending} readings wait for their commit already; retry shortly",
                headers={"Retry-After": str(_RETRY_AFTER_S)},
            )  # fmt: skip
        loop = asyncio.get_running_loop()
        topic = topic or topics.readings(meter_id)
        futures: list[asyncio.Future[bytes]] = []
        for payload in payloads:
            future: asyncio.Future[bytes] = loop.create_future()
            self._waiting[meter_id].append(future)
            self._pending += 1
            self._deliver(Delivery(Message(topic, payload, wall_ms()), None, 0))
            futures.append(future)
        return futures


async def receipts(futures: Sequence[asyncio.Future[bytes]], timeout_s: float) -> list[Receipt]:
    """The receipts, parsed, once all are in; 503 if the commit takes longer than `timeout_s`
    (the reading may still be stored: submitting it again is answered `duplicate`).
    `asyncio.wait` leaves the futures to the pipeline on a timeout, without a shield task
    per reading."""
    if not futures:
        return []
    _, pending = await asyncio.wait(futures, timeout=timeout_s)
    if pending:
        raise ApiError(
            503, "commit_timeout", "no commit in time; submit again (a stored one is a duplicate)"
        )
    return [Receipt.model_validate_json(f.result()) for f in futures]
