"""Where a simulated fleet's identities come from: the PKI folder, or fresh ones issued
through the certs API with a mix of signature algorithms."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from meterproof.certs import IssuedDevice, issue_bulk
from meterproof.certs.bulk import CSV_COLUMNS, default_csv_path, new_meter_ids
from meterproof.certs.keys import replace_file
from meterproof.certs.layout import PkiLayout
from meterproof.meter.identity import MeterIdentity, discover
from meterproof.schemas.reading import Alg

ID_PREFIX: Final = "sim-"
#: RSA-4096 key generation takes about a second per key; simulated meters use 2048 bits.
SIM_RSA_BITS: Final = 2048


def parse_alg_mix(text: str) -> dict[Alg, float]:
    """`"EdDSA=0.8,ES256=0.2"` -> shares summing to 1 (weights are normalised)."""
    mix: dict[Alg, float] = {}
    for part in text.split(","):
        name, sep, weight = part.strip().partition("=")
        try:
            alg = Alg(name.strip())
            share = float(weight) if sep else 1.0
        except ValueError:
            raise ValueError(f"bad alg mix entry {part.strip()!r}: want ALG=WEIGHT") from None
        if alg in mix or not math.isfinite(share) or share < 0:
            raise ValueError(f"bad alg mix entry {part.strip()!r}: repeated or negative")
        mix[alg] = share
    total = sum(mix.values())
    if total <= 0:
        raise ValueError("the alg mix needs a positive weight")
    return {alg: share / total for alg, share in mix.items()}


def split_counts(total: int, mix: Mapping[Alg, float]) -> dict[Alg, int]:
    """Largest-remainder rounding: the counts add up to `total` exactly."""
    exact = {alg: total * share for alg, share in mix.items()}
    counts = {alg: math.floor(value) for alg, value in exact.items()}
    by_remainder = sorted(mix, key=lambda alg: exact[alg] - counts[alg], reverse=True)
    for alg in by_remainder[: total - sum(counts.values())]:
        counts[alg] += 1
    return counts


def issue_fleet(
    layout: PkiLayout, count: int, mix: Mapping[Alg, float]
) -> tuple[list[MeterIdentity], Path]:
    """New meters and the bulk CSV that registers them."""
    devices = []
    for alg, n in split_counts(count, mix).items():
        if n:
            ids = new_meter_ids(n, prefix=ID_PREFIX)
            devices += issue_bulk(layout, ids, alg=alg, rsa_bits=SIM_RSA_BITS)
    csv_path = default_csv_path(layout, datetime.now(UTC))
    write_registration_csv(devices, csv_path)
    return [MeterIdentity.load(device.files) for device in devices], csv_path


def wallet_of(meter_id: str) -> str:
    """Each simulated household has a ledger account of its own, named after its meter,
    so that what its roof exports is minted somewhere the demo can show."""
    return f"wallet-{meter_id.removeprefix(ID_PREFIX)}"


def write_registration_csv(devices: Sequence[IssuedDevice], path: Path) -> None:
    """The `certs issue-bulk` summary plus `owner_wallet`, as `meters register --bulk`
    reads it (each PEM newline written as the two characters backslash and n)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow((*CSV_COLUMNS, "owner_wallet"))
    for device in devices:
        record = device.record
        pem = device.public_key_pem.replace("\n", "\\n")
        row = (record.name, record.alg, pem, record.sha256_fingerprint, record.serial)
        writer.writerow((*row, wallet_of(record.name)))
    replace_file(path, out.getvalue().encode("utf-8"))


def pki_fleet(layout: PkiLayout, count: int | None) -> list[MeterIdentity]:
    """The first `count` meters of the PKI folder by id (all of them if None)."""
    found = discover(layout, limit=count)
    if not found or (count is not None and len(found) < count):
        raise ValueError(
            f"{layout.devices_dir} holds {len(found)} meter identities, {count or 1}+ needed:"
            " issue them with `meterproof certs issue-bulk`"
        )
    return found
