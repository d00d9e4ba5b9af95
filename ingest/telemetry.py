"""Metrics, one pattern for names (`meterproof_<thing>_<unit>_total`), plus the two names the
seeds ask for. The HTTP endpoints that serve them are `meterproof.probes`.

Telemetry is per batch: counters are incremented once per batch with the batch's counts.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from meterproof.ingest._wire import Drop
from meterproof.schemas.reading import RejectReason

RECEIVED = Counter("meterproof_readings_received_total", "Messages taken from the broker")
ACCEPTED = Counter("meterproof_readings_accepted_total", "Readings stored for the first time")
DUPLICATE = Counter("meterproof_readings_duplicate_total", "Readings already stored (same hash)")
REJECTED = Counter(
    "meterproof_readings_rejected_total", "Readings rejected, by spec reason", ["reason"]
)
SIGNATURE_FAILURES = Counter(
    "energy_signature_verification_failures_total", "Readings whose signature did not verify"
)
BATCH_SIZE = Histogram(
    "meterproof_batch_readings",
    "Messages per committed batch",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000),
)
COMMIT_SECONDS = Histogram(
    "meterproof_batch_commit_seconds",
    "Time of the store transaction of a batch",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
ORACLE_LATENCY = Histogram(
    "oracle_latency_seconds",
    "From the reading's ts to its commit (end-to-end latency)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
QUEUE_DEPTH = Gauge("meterproof_queue_depth_messages", "Messages received, not yet committed")
DEPENDENCY_ERRORS = Counter(
    "meterproof_dependency_errors_total", "Failures of a dependency", ["dependency"]
)
REPLAY_CHECKS = Counter(
    "meterproof_replay_checks_total",
    "Verified readings, by who judged first whether they were seen: redis (this worker may"
    " have seen it) or database (above its meter's highest seq here)",
    ["asked"],
)
QUARANTINED = Counter("meterproof_meters_quarantined_total", "Meters quarantined by the worker")
BROKER_REFUSALS = Counter(
    "meterproof_broker_refusals_total",
    "Refusals of this worker by a broker: of a connection attempt (packet=connack) or of the"
    " readings' subscription (packet=suback), by MQTT reason code (one byte: bounded)",
    ["packet", "reason_code"],
)
PACKETS_DROPPED = Counter(
    "meterproof_mqtt_packets_dropped_total",
    "MQTT packets (or the rest of a stream) dropped as malformed, by reason",
    ["reason"],
)

for _reason in RejectReason:  # every label exists from the start, at zero
    REJECTED.labels(reason=_reason.value)
for _dependency in ("database", "redis", "broker"):
    DEPENDENCY_ERRORS.labels(dependency=_dependency)
for _asked in ("redis", "database"):
    REPLAY_CHECKS.labels(asked=_asked)
for _drop in Drop:
    PACKETS_DROPPED.labels(reason=_drop.value)
VERIFIED_AGAIN = Counter(
    "meterproof_readings_verified_again_total",
    "Readings judged duplicate (same hash) whose verified copies were sent again: their first"
    " may have been lost with a worker that died or stopped after the commit",
)
