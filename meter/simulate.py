"""The fleet simulator: hundreds to thousands of meters in one process, on one asyncio loop.

Every meter is a full reference client (seq state, outbox, receipts, republish) and all
of them share one `Network`, so a meter costs a TLS socket and some memory rather than a
paho thread (`loop_start()` per meter would mean a thousand threads each waking up every
second). Meters start at random offsets within the first interval, so they do not report
in waves, and read their registers from a household curve (`meter.profile`). A chosen
fraction misbehaves on every other reading (`meter.misbehave`), and the summary says
whether the ingest side answered each bad reading as it should.

Outcome, also as the command's exit code (`FleetSummary.exit_code`):
0 every reading receipted as intended; 1 some receipt was not the one the meter intended
(an honest reading rejected, say `unknown_meter`, or a bad one accepted); 3 readings still
unreceipted after the final wait (no worker running?). Unreceipted readings stay in each
meter's outbox under the state dir and go out again on the next run with the same meters.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog

from meterproof.meter.client import DEFAULT_KEEPALIVE_S, Broker, ClientSettings, MeterClient
from meterproof.meter.identity import MeterIdentity
from meterproof.meter.measurement import Measurement
from meterproof.meter.misbehave import (
    EXPECTED,
    Misbehaviour,
    corrupt_signature,
    roll_back,
    skew_clock,
)
from meterproof.meter.network import Network
from meterproof.meter.outbox import Pending
from meterproof.meter.profile import Profile, profile_for
from meterproof.schemas.codec import decode_reading
from meterproof.schemas.reading import Receipt, ReceiptStatus, SignedReading
from meterproof.schemas.timestamps import wall_ms

log = structlog.get_logger("meter.simulate")

EXIT_OK: Final = 0
EXIT_UNEXPECTED: Final = 1
EXIT_UNRECEIPTED: Final = 3


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """How the fleet behaves; checked when built."""

    interval_s: float = 5.0
    readings: int = 6
    #: Share of meters that misbehave (on every other reading, one kind each).
    misbehave: float = 0.0
    #: Bounded wait for the last receipts once every reading is sent.
    receipt_timeout_s: float = 30.0
    #: A meter republishes a reading with no receipt this long after its PUBACK.
    republish_after_s: float = 15.0
    #: MQTT keepalive: a broker silent this long is pinged, and left after as long again.
    keepalive_s: int = DEFAULT_KEEPALIVE_S
    progress_every_s: float = 5.0
    prosumer_share: float = 0.4
    seed: int | None = None
    #: Concurrent TLS handshakes while the fleet connects (the broker does ~740/s).
    connect_workers: int = 4

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError(f"interval must be positive, not {self.interval_s}")
        if self.readings < 1:
            raise ValueError(f"readings must be at least 1, not {self.readings}")
        if not 0.0 <= self.misbehave <= 1.0:
            raise ValueError(f"misbehave is a fraction in [0, 1], not {self.misbehave}")
        if self.receipt_timeout_s < 0:
            raise ValueError(f"receipt timeout must not be negative: {self.receipt_timeout_s}")
        if self.progress_every_s <= 0:
            raise ValueError(f"progress interval must be positive, not {self.progress_every_s}")
        self.client_settings()  # validates republish_after_s and keepalive_s

    def client_settings(self) -> ClientSettings:
        # Not durable: the state survives a crash of the simulator (atomic renames), and
        # fsyncing hundreds of files a second would only measure the disk. Seqs reserved
        # in blocks: one state write per 100 readings instead of one per reading.
        return ClientSettings(
            republish_after_s=self.republish_after_s,
            keepalive_s=self.keepalive_s,
            durable=False,
            seq_block=100,
        )


@dataclass(frozen=True, slots=True)
class Progress:
    elapsed_s: float
    meters: int
    connected: int
    sent: int
    accepted: int
    duplicate: int
    rejected: int
    pending: int

    @property
    def receipted(self) -> int:
        return self.accepted + self.duplicate + self.rejected

    def line(self) -> str:
        return (
            f"{self.elapsed_s:6.1f}s  connected {self.connected}/{self.meters}  "
            f"sent {self.sent}  receipted {self.receipted}  accepted {self.accepted}  "
            f"duplicate {self.duplicate}  rejected {self.rejected}  pending {self.pending}"
        )


@dataclass(frozen=True, slots=True)
class FleetSummary:
    """The run's outcome; `to_dict()` is what `--json` prints and a demo can assert on."""

    meters: int
    sent: int
    accepted: int
    duplicate: int
    rejected: dict[str, int]
    unreceipted: int
    republished: int
    misbehaved: int
    caught: int
    unexpected: int
    elapsed_s: float

    @property
    def receipted(self) -> int:
        return self.accepted + self.duplicate + sum(self.rejected.values())

    @property
    def exit_code(self) -> int:
        if self.unexpected:
            return EXIT_UNEXPECTED
        if self.unreceipted:
            return EXIT_UNRECEIPTED
        return EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "meters": self.meters,
            "sent": self.sent,
            "receipted": self.receipted,
            "accepted": self.accepted,
            "duplicate": self.duplicate,
            "rejected": dict(sorted(self.rejected.items())),
            "unreceipted": self.unreceipted,
            "republished": self.republished,
            "misbehaved": self.misbehaved,
            "caught": self.caught,
            "unexpected": self.unexpected,
            "elapsed_s": round(self.elapsed_s, 3),
            "exit_code": self.exit_code,
        }

    def lines(self) -> list[str]:
        rejected = ", ".join(f"{r} {n}" for r, n in sorted(self.rejected.items())) or "none"
        out = [
            f"meters       {self.meters}",
            f"sent         {self.sent} readings in {self.elapsed_s:.1f} s "
            f"({self.republished} republished)",
            f"accepted     {self.accepted}",
            f"duplicate    {self.duplicate}",
            f"rejected     {sum(self.rejected.values())} ({rejected})",
            f"unreceipted  {self.unreceipted}",
        ]
        if self.misbehaved:
            out.append(
                f"misbehaved   {self.misbehaved} bad readings, {self.caught} caught as intended"
            )
        if self.unexpected:
            out.append(f"UNEXPECTED   {self.unexpected} receipts were not what the meter intended")
        if self.unreceipted:
            out.append(
                "             unreceipted readings stay in the outboxes: is a worker running?"
            )
        return out


@dataclass(slots=True)
class _Scorecard:
    """Checks each receipt against what the meter meant: honest, or one misbehaviour."""

    meter_id: str
    intents: dict[tuple[int, str], Misbehaviour] = field(default_factory=dict)
    last_accepted: SignedReading | None = None
    misbehaved: int = 0
    caught: int = 0
    unexpected: int = 0

    def intend(self, entry: Pending, kind: Misbehaviour) -> None:
        self.intents[(entry.seq, entry.reading_hash)] = kind
        self.misbehaved += 1

    def on_receipt(self, entry: Pending, receipt: Receipt) -> None:
        kind = self.intents.pop((entry.seq, entry.reading_hash), None)
        if kind is not None:
            if (receipt.status, receipt.reason) == EXPECTED[kind]:
                self.caught += 1
                return
        elif receipt.status is not ReceiptStatus.REJECTED:
            if receipt.status is ReceiptStatus.ACCEPTED and (
                self.last_accepted is None or entry.seq > self.last_accepted.seq
            ):
                self.last_accepted = decode_reading(entry.payload)
            return
        self.unexpected += 1
        log.warning(
            "simulate.unexpected_receipt",
            meter_id=self.meter_id,
            seq=entry.seq,
            intended=kind.value if kind else "honest",
            status=receipt.status.value,
            reason=receipt.reason and receipt.reason.value,
        )


@dataclass(slots=True)
class _SimMeter:
    """One meter of the fleet: its client, its household and its (mis)behaviour."""

    client: MeterClient
    score: _Scorecard
    profile: Profile
    rng: random.Random
    offset_s: float
    misbehaviour: Misbehaviour | None

    def take_reading(self, index: int) -> None:
        measurement = self.profile.measure(wall_ms(), self.rng)
        kind = self.misbehaviour if index % 2 == 1 else None
        reading = self._bad_reading(kind, measurement) if kind else None
        if kind is None or reading is None:
            self.client.submit(measurement)
        else:
            self.score.intend(self.client.send(reading), kind)

    def _bad_reading(self, kind: Misbehaviour, measurement: Measurement) -> SignedReading | None:
        """None when this kind needs an accepted reading the meter does not have yet."""
        client, last = self.client, self.score.last_accepted
        if kind is Misbehaviour.BAD_SIGNATURE:
            return corrupt_signature(client.sign(client.reserve_seq(), measurement))
        if kind is Misbehaviour.CLOCK_SKEW:
            return client.sign(client.reserve_seq(), skew_clock(measurement))
        if last is None or client.is_pending(last.seq):
            return None
        if kind is Misbehaviour.REPLAY:
            return last
        if kind is Misbehaviour.SEQ_REUSE:
            return client.sign(last.seq, measurement)
        rolled = roll_back(measurement, last)
        return None if rolled is None else client.sign(client.reserve_seq(), rolled)


ProgressHook = Callable[[Progress], None]


async def simulate_fleet(
    identities: Sequence[MeterIdentity],
    *,
    broker: Broker,
    state_root: Path,
    config: FleetConfig,
    on_progress: ProgressHook | None = None,
) -> FleetSummary:
    """Run the fleet to completion: every reading sent, receipts awaited (bounded)."""
    if not identities:
        raise ValueError("no meters to simulate")
    rng = random.Random(config.seed)  # noqa: S311 - simulation, not secrets
    plan = _misbehaviour_plan(len(identities), config.misbehave, rng)
    async with Network(connect_workers=config.connect_workers) as network:
        meters = []
        for n, identity in enumerate(identities):
            score = _Scorecard(identity.meter_id)
            client = MeterClient(
                identity,
                broker=broker,
                state_dir=state_root / identity.meter_id,
                network=network,
                settings=config.client_settings(),
                on_receipt=score.on_receipt,
            )
            meters.append(
                _SimMeter(
                    client=client,
                    score=score,
                    profile=profile_for(identity.meter_id, prosumer_share=config.prosumer_share),
                    rng=random.Random(rng.random()),  # noqa: S311
                    offset_s=rng.uniform(0, config.interval_s),
                    misbehaviour=plan.get(n),
                )
            )
        started = time.monotonic()  # after the set-up, so the start offsets hold
        reporter = (
            asyncio.create_task(_report(meters, started, config.progress_every_s, on_progress))
            if on_progress is not None
            else None
        )
        try:
            await asyncio.gather(*(_read(sim, started, config) for sim in meters))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(config.receipt_timeout_s):
                    await asyncio.gather(*(sim.client.drain() for sim in meters))
        finally:
            if reporter is not None and on_progress is not None:
                reporter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reporter
                on_progress(_progress(meters, started))
            await asyncio.gather(*(sim.client.stop() for sim in meters))
    return _summary(meters, time.monotonic() - started)


def run_simulation(
    identities: Sequence[MeterIdentity],
    *,
    broker: Broker,
    state_root: Path,
    config: FleetConfig,
    on_progress: ProgressHook | None = None,
) -> FleetSummary:
    """`simulate_fleet` on a loop of its own, for callers that are not async."""
    return asyncio.run(
        simulate_fleet(
            identities,
            broker=broker,
            state_root=state_root,
            config=config,
            on_progress=on_progress,
        )
    )


def _misbehaviour_plan(meters: int, fraction: float, rng: random.Random) -> dict[int, Misbehaviour]:
    """Which meters misbehave, the kinds dealt round-robin so each shows up."""
    chosen = sorted(rng.sample(range(meters), round(fraction * meters)))
    kinds = list(Misbehaviour)
    return {n: kinds[i % len(kinds)] for i, n in enumerate(chosen)}


async def _read(sim: _SimMeter, started: float, config: FleetConfig) -> None:
    """Power on at the meter's offset (spreading the TLS handshakes too), then read."""
    for index in range(config.readings):
        due = started + sim.offset_s + index * config.interval_s
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        if index == 0:
            sim.client.start()
        sim.take_reading(index)


async def _report(
    meters: Sequence[_SimMeter], started: float, every_s: float, hook: ProgressHook
) -> None:
    while True:
        await asyncio.sleep(every_s)
        hook(_progress(meters, started))


def _progress(meters: Sequence[_SimMeter], started: float) -> Progress:
    stats = [sim.client.stats for sim in meters]
    return Progress(
        elapsed_s=time.monotonic() - started,
        meters=len(meters),
        connected=sum(sim.client.connected for sim in meters),
        sent=sum(s.submitted for s in stats),
        accepted=sum(s.accepted for s in stats),
        duplicate=sum(s.duplicate for s in stats),
        rejected=sum(s.rejected.total() for s in stats),
        pending=sum(sim.client.pending for sim in meters),
    )


def _summary(meters: Sequence[_SimMeter], elapsed_s: float) -> FleetSummary:
    rejected: Counter[str] = Counter()
    for sim in meters:
        rejected.update(sim.client.stats.rejected)
    return FleetSummary(
        meters=len(meters),
        sent=sum(sim.client.stats.submitted for sim in meters),
        accepted=sum(sim.client.stats.accepted for sim in meters),
        duplicate=sum(sim.client.stats.duplicate for sim in meters),
        rejected=dict(rejected),
        unreceipted=sum(sim.client.pending for sim in meters),
        republished=sum(sim.client.stats.republished for sim in meters),
        misbehaved=sum(sim.score.misbehaved for sim in meters),
        caught=sum(sim.score.caught for sim in meters),
        unexpected=sum(sim.score.unexpected for sim in meters),
        elapsed_s=elapsed_s,
    )
