"""The bridge's metrics, in the project's one pattern (`meterproof_<thing>_<unit>_total`
for counters), plus the Energy Market seed's unsettled-credits gauge, whose `_total`
suffix Prometheus reserves for counters: it is `energy_pending_credits_kwh` here.
Updated per batch."""

from __future__ import annotations

from typing import get_args

from prometheus_client import Counter, Gauge, Histogram

from meterproof.bridge.ledger.sink import ErrorCode

EPOCHS_SEALED = Counter("meterproof_epochs_sealed_total", "Batches sealed (one per epoch)")
READINGS_ANCHORED = Counter(
    "meterproof_readings_anchored_total", "Readings in batches the sink acknowledged"
)
READINGS_CLAIMED = Counter(
    "meterproof_readings_claimed_total", "Readings claimed into a batch (anchored once sealed)"
)
GRID_MINTED = Counter("meterproof_grid_minted_total", "GRID minted by anchored batches (1 = 1 kWh)")
SUBMISSIONS_FAILED = Counter(
    "meterproof_submissions_failed_total", "Sink submissions that failed, by error code", ["code"]
)
SUMMARIES_PUBLISHED = Counter(
    "meterproof_summaries_published_total", "Epoch summaries acknowledged by the broker"
)
ANCHORS_LOST = Counter(
    "meterproof_anchors_lost_total",
    "Anchored batches the sink no longer holds (a chain reorg), set back to pending",
)
AWAITING_CONFIRMATION = Counter(
    "meterproof_anchor_confirmation_waits_total",
    "Passes that found the batch recorded but not yet final (fewer than N blocks deep)",
)
RELEASES = Counter(
    "meterproof_grid_releases_total",
    "Claim leaves of meters without an EVM wallet at sealing, released to the wallet linked"
    " since (`chain release`), by outcome (deferred: the bridge's anchor was in flight)",
    ["outcome"],
)
REPLACEMENTS = Counter(
    "meterproof_anchor_replacements_total",
    "Anchoring transactions replaced by nonce with higher fees after evm_stall_s, by reason:"
    " stalled (the node holds it, unmined) or not_in_pool (dropped, and its bytes refused)",
    ["reason"],
)
BATCHES_PENDING = Gauge("meterproof_batches_pending", "Sealed batches not yet anchored")
PENDING_CREDITS = Gauge(
    "energy_pending_credits_kwh", "kWh (= GRID) in sealed batches not yet anchored"
)
ANCHORING_LAG = Histogram(
    "meterproof_anchoring_lag_seconds",
    "From the end of a batch's epoch to the sink's receipt",
    buckets=(1, 5, 15, 30, 60, 120, 300, 900, 1800, 3600, 4 * 3600, 24 * 3600),
)

for _code in get_args(ErrorCode):
    SUBMISSIONS_FAILED.labels(code=_code)
for _outcome in ("released", "reverted", "deferred"):
    RELEASES.labels(outcome=_outcome)
for _reason in ("stalled", "not_in_pool"):
    REPLACEMENTS.labels(reason=_reason)
