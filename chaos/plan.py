"""The fault schedule (pure): which faults, in which order, at which moment of the load.

Faults run one at a time, so a recovery time belongs to one fault. The order is shuffled
and the slack of the fault window is spread as random gaps, both from a seeded RNG, so a
campaign is reproducible (`--seed`) yet faults land at unplanned points of the
pipeline. A plan that cannot fit its time bound is refused when built, not discovered at
minute 14.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Final

from meterproof.errors import InputError


class FaultKind(StrEnum):
    WORKER_KILL = "worker_kill9"
    BROKER_RESTART = "broker_restart"
    BROKER_KILL = "broker_kill9"
    POSTGRES_STOP = "postgres_stop"
    REDIS_STOP = "redis_stop"
    BRIDGE_KILL = "bridge_kill9"
    PRIMARY_KILL = "pg_primary_kill9"
    SWITCHOVER = "pg_switchover"
    ETCD_KILL = "etcd_member_kill9"
    STANDBY_FREEZE = "pg_standby_frozen"
    PRIMARY_PAUSE = "pg_primary_paused"
    BROKER_LOST = "broker_lost"
    BROKER_PAUSE = "broker_paused"


#: The faults only a Patroni cluster (`--ha`) can take, and the one it cannot: stopping
#: "the" PostgreSQL means something else when there are two.
HA_KINDS: Final = frozenset(
    {
        FaultKind.PRIMARY_KILL,
        FaultKind.SWITCHOVER,
        FaultKind.ETCD_KILL,
        FaultKind.STANDBY_FREEZE,
        FaultKind.PRIMARY_PAUSE,
        FaultKind.BROKER_LOST,
        FaultKind.BROKER_PAUSE,
    }
)
SINGLE_KINDS: Final = frozenset({FaultKind.POSTGRES_STOP})

DESCRIPTION: Final[Mapping[FaultKind, str]] = {
    FaultKind.WORKER_KILL: "kill -9 of one ingest worker (the supervisor restarts it)",
    FaultKind.BROKER_RESTART: "graceful broker restart (SIGTERM, start)",
    FaultKind.BROKER_KILL: "kill -9 of the broker, started again 1 s later",
    FaultKind.POSTGRES_STOP: "PostgreSQL stopped (fast shutdown), started after the outage",
    FaultKind.REDIS_STOP: "Redis stopped, started after the outage",
    FaultKind.BRIDGE_KILL: "kill -9 of the bridge at a random moment or at a crash point",
    FaultKind.PRIMARY_KILL: "kill -9 of the PostgreSQL primary's postmaster; Patroni fails "
    "over to the synchronous standby (duration: kill -> first reading stored after it; none "
    "within the recovery timeout: not recovered)",
    FaultKind.SWITCHOVER: "planned switchover to the standby through Patroni's REST API",
    FaultKind.ETCD_KILL: "kill -9 of one of three etcd members, started again 5 s later",
    FaultKind.STANDBY_FREEZE: "the synchronous standby's PostgreSQL stopped (SIGSTOP, "
    "connections open) for 15 s: a standby falling behind at its worst",
    FaultKind.PRIMARY_PAUSE: "the primary's PostgreSQL and Patroni stopped (SIGSTOP, "
    "connections open: a machine paused) for 20 s, past the leader key's TTL; Patroni "
    "fails over, the workers give up their waits on it after their database_timeout_s "
    "(10 s here) (duration: the pause; the note: pause -> first reading stored after it; "
    "none stored while paused: not recovered)",
    FaultKind.BROKER_LOST: "kill -9 of one of the two brokers (in turn: the one the meters "
    "moved to last time), started again once every meter stored a reading through the other "
    "(duration: kill -> that moment, the fleet's failover time; not reached within the "
    "recovery timeout: not recovered)",
    FaultKind.BROKER_PAUSE: "one of the two brokers stopped (SIGSTOP, connections open: a "
    "machine paused; in turn with broker_lost), resumed once every meter stored a reading "
    "through the other: the meters leave it by their keepalive, the workers cut their link "
    "to it after broker_silent_s (duration: pause -> that moment; not reached within the "
    "recovery timeout: not recovered)",
}

#: How a bridge fault kills: at a random moment, or (after that kill) once more at one of
#: the anchoring protocol's crash points (`bridge.faults`), then a normal restart.
BRIDGE_VARIANTS: Final = ("random", "before_submit", "during_submit", "after_submit")

#: Time to start the stack, issue and register the fleet (3 s for 100 meters on the
#: 2-core machine), and to audit, on top of the load and the settle bound; with room to
#: spare for a plan that slips.
SETUP_ALLOWANCE_S: Final = 20.0
#: How long a killed etcd member stays down before it is started again.
ETCD_DOWN_S: Final = 5.0
#: How long the standby stays frozen: longer than Patroni takes to drop it (~10 s).
STANDBY_FROZEN_S: Final = 15.0
#: How long the primary stays paused: past the leader key's TTL (10 s) and the workers'
#: `database_timeout_s` (`WORKER_DATABASE_TIMEOUT_S`), so the failover must happen and
#: the pipeline must find the new primary while the old one is still silent.
PRIMARY_PAUSED_S: Final = 20.0
#: The workers' `database_timeout_s` in a campaign, below the pause.
WORKER_DATABASE_TIMEOUT_S: Final = 10.0
AUDIT_ALLOWANCE_S: Final = 15.0


@dataclass(frozen=True, slots=True)
class CampaignConfig:
    """Everything a campaign does, checked when built."""

    duration_s: float
    counts: Mapping[FaultKind, int]
    meters: int = 300
    interval_s: float = 2.0
    workers: int = 2
    seed: int = 1
    #: Load before the first fault: every session is saved by the broker (autosave 10 s).
    warmup_s: float = 15.0
    #: Load after the last fault's slot, so it too recovers under load.
    cooldown_s: float = 10.0
    #: Bound on the final wait for the last receipts and anchors.
    settle_s: float = 90.0
    postgres_outage_s: float = 20.0
    redis_outage_s: float = 5.0
    #: A fault not recovered by then is recorded as such and the next one goes ahead.
    recovery_timeout_s: float = 60.0
    epoch_s: int = 5
    seal_delay_s: float = 1.0
    claim_interval_s: float = 0.5
    republish_after_s: float = 10.0
    #: The fleet's MQTT keepalive: how soon a meter leaves a broker gone silent.
    meter_keepalive_s: int = 5
    #: PostgreSQL as a Patroni cluster (`stack up --ha`): the HA faults instead of the stop.
    ha: bool = False

    def __post_init__(self) -> None:
        if self.meters < 1 or self.workers < 1:
            raise ValueError("need at least one meter and one worker")
        if self.interval_s < 2.0:
            # The ingest rate rule allows 60 readings per minute of meter time; a meter
            # reading every second sits on that limit and loses readings to rate_limited.
            raise ValueError(f"interval must be at least 2 s, not {self.interval_s}")
        if any(n < 0 for n in self.counts.values()):
            raise ValueError("fault counts must not be negative")
        unfit = SINGLE_KINDS if self.ha else HA_KINDS
        if wrong := sorted(kind.value for kind in unfit if self.counts.get(kind)):
            raise ValueError(f"{', '.join(wrong)} need {'no ' if self.ha else ''}--ha")
        for name in ("postgres_outage_s", "redis_outage_s", "recovery_timeout_s", "settle_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.load_s < self.warmup_s + self.cooldown_s:
            raise ValueError(
                f"{self.duration_s:.0f} s leaves {self.load_s:.0f} s of load, less than the "
                f"warm-up and cool-down ({self.warmup_s + self.cooldown_s:.0f} s)"
            )

    @property
    def load_s(self) -> float:
        """How long the fleet generates readings: the bound minus everything else."""
        return self.duration_s - SETUP_ALLOWANCE_S - self.settle_s - AUDIT_ALLOWANCE_S

    @property
    def readings_per_meter(self) -> int:
        return max(1, math.ceil(self.load_s / self.interval_s))

    def with_changes(self, **changes: object) -> CampaignConfig:
        return replace(self, **changes)  # type: ignore[arg-type]


FULL_COUNTS: Final[Mapping[FaultKind, int]] = {
    FaultKind.WORKER_KILL: 20,
    FaultKind.BROKER_RESTART: 3,
    FaultKind.BROKER_KILL: 3,
    FaultKind.POSTGRES_STOP: 3,
    FaultKind.REDIS_STOP: 3,
    FaultKind.BRIDGE_KILL: 10,
}
QUICK_COUNTS: Final[Mapping[FaultKind, int]] = {
    FaultKind.WORKER_KILL: 3,
    FaultKind.BROKER_RESTART: 1,
    FaultKind.BROKER_KILL: 1,
    FaultKind.POSTGRES_STOP: 1,
    FaultKind.REDIS_STOP: 1,
    FaultKind.BRIDGE_KILL: 2,
}
#: The same, with the cluster's faults in place of the PostgreSQL stop.
HA_FULL_COUNTS: Final[Mapping[FaultKind, int]] = {
    **{kind: n for kind, n in FULL_COUNTS.items() if kind not in SINGLE_KINDS},
    FaultKind.PRIMARY_KILL: 3,
    FaultKind.SWITCHOVER: 3,
    FaultKind.ETCD_KILL: 3,
    FaultKind.STANDBY_FREEZE: 2,
    FaultKind.PRIMARY_PAUSE: 2,
    FaultKind.BROKER_LOST: 3,
    FaultKind.BROKER_PAUSE: 2,
}
HA_QUICK_COUNTS: Final[Mapping[FaultKind, int]] = {
    **{kind: n for kind, n in QUICK_COUNTS.items() if kind not in SINGLE_KINDS},
    FaultKind.PRIMARY_KILL: 1,
    FaultKind.SWITCHOVER: 1,
    FaultKind.ETCD_KILL: 1,
    FaultKind.STANDBY_FREEZE: 1,
    FaultKind.PRIMARY_PAUSE: 1,
    FaultKind.BROKER_LOST: 1,
    FaultKind.BROKER_PAUSE: 1,
}


def full_config(*, ha: bool = False, **changes: object) -> CampaignConfig:
    """The issue's campaign: 15 minutes, every fault kind at least the asked number of times."""
    counts = HA_FULL_COUNTS if ha else FULL_COUNTS
    return CampaignConfig(duration_s=900, counts=counts, ha=ha).with_changes(**changes)


def quick_config(*, ha: bool = False, **changes: object) -> CampaignConfig:
    """Every fault kind at least once in 3 minutes (5 with the cluster's faults);
    shorter PostgreSQL outage, smaller fleet."""
    base = CampaignConfig(
        duration_s=300 if ha else 180,
        counts=HA_QUICK_COUNTS if ha else QUICK_COUNTS,
        ha=ha,
        meters=100,
        settle_s=30,
        epoch_s=2,
        postgres_outage_s=8,
        redis_outage_s=3,
        republish_after_s=5,
        recovery_timeout_s=30,
        warmup_s=12,
        cooldown_s=5,
    )
    return base.with_changes(**changes)


@dataclass(frozen=True, slots=True)
class PlannedFault:
    kind: FaultKind
    #: Seconds after the load started at which the fault is due.
    at_s: float
    variant: str = "-"
    outage_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Plan:
    faults: tuple[PlannedFault, ...]
    window: tuple[float, float]
    #: Planned seconds not taken by any fault's expected cost, spread as gaps.
    slack_s: float = field(default=0.0)

    def counts(self) -> dict[FaultKind, int]:
        out = dict.fromkeys(FaultKind, 0)
        for fault in self.faults:
            out[fault.kind] += 1
        return out


class PlanError(InputError):
    """The faults asked for do not fit the time bound."""


def expected_cost_s(kind: FaultKind, config: CampaignConfig, variant: str = "-") -> float:
    """What a fault takes, injection plus a typical recovery, to see whether a plan fits."""
    anchoring = config.epoch_s + config.seal_delay_s + 2 * config.claim_interval_s
    costs = {
        FaultKind.WORKER_KILL: 4.0,
        FaultKind.BROKER_RESTART: 8.0,
        FaultKind.BROKER_KILL: config.republish_after_s + 8.0,
        FaultKind.POSTGRES_STOP: config.postgres_outage_s + 10.0,
        FaultKind.REDIS_STOP: config.redis_outage_s + 4.0,
        FaultKind.BRIDGE_KILL: (anchoring + 3.0) * (1 if variant == "random" else 2),
        # failover, then the crashed node's rewind and resync as the standby
        FaultKind.PRIMARY_KILL: 20.0,
        FaultKind.SWITCHOVER: 15.0,
        FaultKind.ETCD_KILL: ETCD_DOWN_S + 5.0,
        # frozen, then caught up and made synchronous again
        FaultKind.STANDBY_FREEZE: STANDBY_FROZEN_S + 10.0,
        # paused, then resumed as the new primary's standby and made synchronous again
        FaultKind.PRIMARY_PAUSE: PRIMARY_PAUSED_S + 15.0,
        # every meter through the other broker (a reconnect, then one interval), restart
        FaultKind.BROKER_LOST: config.interval_s + 10.0,
        # the same, once the meters' keepalive gave up on the silent broker (a ping, then
        # as long again)
        FaultKind.BROKER_PAUSE: 2 * config.meter_keepalive_s + config.interval_s + 10.0,
    }
    return costs[kind]


def make_plan(config: CampaignConfig) -> Plan:
    """Shuffle the faults, then place them in the fault window with random gaps."""
    rng = random.Random(config.seed)  # noqa: S311 - a schedule, not a secret
    kinds = [kind for kind in FaultKind for _ in range(config.counts.get(kind, 0))]
    rng.shuffle(kinds)
    bridge_turn = 0
    drafted: list[PlannedFault] = []
    for kind in kinds:
        variant, outage = "-", 0.0
        if kind is FaultKind.BRIDGE_KILL:
            variant = BRIDGE_VARIANTS[bridge_turn % len(BRIDGE_VARIANTS)]
            bridge_turn += 1
        elif kind is FaultKind.POSTGRES_STOP:
            outage = config.postgres_outage_s
        elif kind is FaultKind.REDIS_STOP:
            outage = config.redis_outage_s
        drafted.append(PlannedFault(kind, 0.0, variant, outage))
    start, end = config.warmup_s, config.load_s - config.cooldown_s
    costs = [expected_cost_s(f.kind, config, f.variant) for f in drafted]
    slack = (end - start) - sum(costs)
    if slack < 0:
        raise PlanError(
            f"{len(drafted)} faults need about {sum(costs):.0f} s but the fault window is "
            f"{end - start:.0f} s: raise the duration or lower the counts"
        )
    weights = [rng.random() for _ in drafted]
    total = sum(weights) or 1.0
    at, placed = start, []
    for fault, cost, weight in zip(drafted, costs, weights, strict=True):
        at += slack * weight / total
        placed.append(replace(fault, at_s=round(at, 2)))
        at += cost
    return Plan(tuple(placed), (start, end), slack)
