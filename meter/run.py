"""One real meter: a reading every interval from its household curve, until stopped or
`count` readings are out, then a bounded wait for their receipts."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
from pathlib import Path

import structlog

from meterproof.meter.client import Broker, ClientSettings, ClientStats, MeterClient
from meterproof.meter.identity import MeterIdentity
from meterproof.meter.network import Network
from meterproof.meter.profile import profile_for
from meterproof.schemas.timestamps import wall_ms

log = structlog.get_logger("meter.run")


async def run_meter(
    identity: MeterIdentity,
    *,
    broker: Broker,
    state_dir: Path,
    interval_s: float,
    count: int | None,
    receipt_timeout_s: float,
    settings: ClientSettings | None = None,
) -> tuple[ClientStats, int]:
    """Return the counters and how many readings are still unreceipted (in the outbox)."""
    if interval_s <= 0:
        raise ValueError(f"interval must be positive, not {interval_s}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    profile = profile_for(identity.meter_id)
    rng = random.Random()  # noqa: S311 - measurement noise
    try:
        async with Network(connect_workers=1) as network:
            client = MeterClient(
                identity, broker=broker, state_dir=state_dir, network=network, settings=settings
            )
            client.start()
            log.info("meter.started", meter_id=identity.meter_id, backlog=client.pending)
            sent = 0
            while not stop.is_set():
                reading = client.submit(profile.measure(wall_ms(), rng))
                sent += 1
                log.info("meter.reading", meter_id=identity.meter_id, seq=reading.seq)
                if count is not None and sent >= count:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval_s)
            if not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(receipt_timeout_s):
                        await client.drain()
            await client.stop()
            return client.stats, client.pending
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
