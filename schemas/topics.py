"""Every MQTT topic of the wire contract, spelled once.

A meter publishes on `meters/{id}/readings` and hears on `meters/{id}/receipts`; every
verified reading goes to `verified/{id}/readings` (services: the bridge), and to
`integrators/{name}/verified/{id}/readings` for each integrator whose consent covers it;
the bridge announces epochs on `ledger/epochs`. Meter ids and integrator names never
contain `/`, `+` or `#` (`reading.METER_ID_PATTERN`, `certs.layout.IDENTITY_RE`).
"""

from __future__ import annotations

from typing import Final

READINGS_FILTER: Final = "meters/+/readings"
RECEIPTS_FILTER: Final = "meters/+/receipts"
VERIFIED_FILTER: Final = "verified/+/readings"
LEDGER_EPOCHS: Final = "ledger/epochs"
#: Everything under a root, as broker ACLs grant it.
VERIFIED_ALL: Final = "verified/#"
LEDGER_ALL: Final = "ledger/#"
#: Every integrator's consented feed, as the ingest workers' ACL grants it.
INTEGRATORS_VERIFIED_ALL: Final = "integrators/+/verified/#"

_READINGS_PREFIX: Final = "meters/"
_READINGS_SUFFIX: Final = "/readings"


def readings(meter_id: str) -> str:
    return f"meters/{meter_id}/readings"


def receipts(meter_id: str) -> str:
    return f"meters/{meter_id}/receipts"


def verified(meter_id: str) -> str:
    return f"verified/{meter_id}/readings"


def integrator_verified(integrator: str, meter_id: str) -> str:
    """One integrator's copy of a meter's verified readings (docs/consent.md)."""
    return f"integrators/{integrator}/verified/{meter_id}/readings"


def integrator_feed(integrator: str) -> str:
    """Everything one integrator may read of verified readings, as its ACL names it."""
    return f"integrators/{integrator}/verified/#"


def of_meter(meter_id: str) -> str:
    """Every topic of one meter, as an ACL names them."""
    return f"meters/{meter_id}/#"


def shared(group: str, topic_filter: str) -> str:
    """An MQTT 5 shared subscription: the broker hands each message to one member."""
    return f"$share/{group}/{topic_filter}"


def meter_of_readings(topic: str) -> str | None:
    """The meter a readings topic names (`meters/{id}/readings`), unchecked; None when
    the topic has another shape."""
    if topic.startswith(_READINGS_PREFIX) and topic.endswith(_READINGS_SUFFIX):
        middle = topic[len(_READINGS_PREFIX) : -len(_READINGS_SUFFIX)]
        if middle and "/" not in middle:
            return middle
    return None
