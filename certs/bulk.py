"""Issuing a fleet at once, and the summary CSV that `meterproof meters register --bulk` reads.

Summary CSV (UTF-8, comma-separated, header row, one meter per line, `\\n` line ends):

    meter_id,alg,public_key_pem,cert_fingerprint,serial

- `meter_id`: the certificate CN and MQTT username.
- `alg`: `EdDSA`, `ES256`, `RS256` or `PS256` - what the signing key is registered for.
- `public_key_pem`: the signing key's SubjectPublicKeyInfo PEM with each newline written
  as the two characters backslash and `n` (PEM never contains a backslash), so that every
  row is one line; `read_bulk_csv` undoes it.
- `cert_fingerprint`: SHA-256 of the TLS certificate's DER, 64 lowercase hex digits.
- `serial`: the TLS certificate's serial number, lowercase hex.

Throughput: the CA is loaded once, and each device costs two key generations, one P-256
signature by the issuing CA (see `certs.authority`) and five small files: 1,000 EdDSA or
ES256 meters take ~0.7 s here, more than half of it creating files. An RSA signing key
costs its generation instead: ~0.04 s at 2048 bits, ~0.4 s at 4096.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

from meterproof.certs.authority import Authority, Validity
from meterproof.certs.errors import PkiError
from meterproof.certs.identities import DEFAULT_DAYS, IssuedDevice, check_name_free, issue_meter
from meterproof.certs.keys import replace_file
from meterproof.certs.layout import IDENTITY_RE, PkiLayout, check_identity
from meterproof.schemas.reading import Alg

CSV_COLUMNS: Final = ("meter_id", "alg", "public_key_pem", "cert_fingerprint", "serial")
_UUID_LENGTH: Final = 36
MAX_PREFIX: Final = 64 - _UUID_LENGTH


@dataclass(frozen=True, slots=True)
class BulkRow:
    meter_id: str
    alg: Alg
    public_key_pem: str
    cert_fingerprint: str
    serial: str


def new_meter_ids(count: int, prefix: str = "") -> list[str]:
    """Lowercase UUID4s, as the registry assigns them (docs/spec/reading-v1.md section 1)."""
    if count < 1:
        raise ValueError(f"count must be at least 1, not {count}")
    if len(prefix) > MAX_PREFIX or not IDENTITY_RE.fullmatch(prefix + "0"):
        raise ValueError(f"prefix {prefix!r}: at most {MAX_PREFIX} characters of [A-Za-z0-9._-]")
    return [f"{prefix}{uuid.uuid4()}" for _ in range(count)]


def issue_bulk(
    layout: PkiLayout,
    meter_ids: Iterable[str],
    *,
    alg: Alg | str = Alg.EDDSA,
    rsa_bits: int = 4096,
    days: int = DEFAULT_DAYS,
    on_issued: Callable[[IssuedDevice], None] | None = None,
) -> list[IssuedDevice]:
    """Check every id first, so a typo or a taken name stops the batch before it starts.

    Each device is published whole or not at all; if a later one fails, the earlier ones
    stay issued, and `on_issued` has already seen each of them (to record or count them).
    """
    ids = list(meter_ids)
    if not ids:
        raise ValueError("no meter ids given")
    repeated = [name for name, n in Counter(ids).items() if n > 1]
    if repeated:
        raise PkiError(f"meter id {repeated[0]!r} appears more than once")
    for meter_id in ids:
        check_name_free(layout, meter_id, "meter")
    algorithm = Alg(alg)
    validity = Validity.of(days)
    authority = Authority.load(layout)
    issued = []
    for meter_id in ids:
        device = issue_meter(
            layout, authority, meter_id, alg=algorithm, rsa_bits=rsa_bits, validity=validity
        )
        issued.append(device)
        if on_issued is not None:
            on_issued(device)
    return issued


def default_csv_path(layout: PkiLayout, now: datetime) -> Path:
    return layout.devices_dir / f"bulk-{now:%Y%m%dT%H%M%S%fZ}.csv"


def write_bulk_csv(devices: Sequence[IssuedDevice], path: Path) -> None:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for device in devices:
        record = device.record
        writer.writerow(
            (
                record.name,
                record.alg,
                device.public_key_pem.replace("\n", "\\n"),
                record.sha256_fingerprint,
                record.serial,
            )
        )
    replace_file(path, out.getvalue().encode("utf-8"))


def read_meter_ids(path: Path) -> list[str]:
    """The `meter_id` column of any CSV (for `issue-bulk --from-csv`)."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if "meter_id" not in (reader.fieldnames or ()):
            raise PkiError(f"{path}: no `meter_id` column")
        ids = []
        for row in reader:
            if row["meter_id"] is None:  # a row shorter than the header
                raise PkiError(f"{path}, line {reader.line_num}: no `meter_id` cell")
            ids.append(row["meter_id"].strip())
        return ids


def read_bulk_csv(path: Path) -> list[BulkRow]:
    """Parse a summary written by `write_bulk_csv`; the reader `meters register` needs."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise PkiError(f"{path}: header must be {','.join(CSV_COLUMNS)}")
        return [
            BulkRow(
                meter_id=check_identity(row["meter_id"]),
                alg=Alg(row["alg"]),
                public_key_pem=row["public_key_pem"].replace("\\n", "\n"),
                cert_fingerprint=row["cert_fingerprint"],
                serial=row["serial"],
            )
            for row in reader
        ]
