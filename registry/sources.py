"""Where registrations come from: the files `certs issue` writes for one meter, and the
summary CSV of `certs issue-bulk`. Both are untrusted input, checked in full before
anything is written; a bad CSV row is reported with its line number.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from meterproof.certs.layout import PkiLayout
from meterproof.registry.errors import InvalidInputError
from meterproof.registry.model import (
    MAX_PEM_BYTES,
    MeterStatus,
    NewKey,
    NewMeter,
    SecurityLevel,
    check_cert_serial,
    check_fingerprint,
    check_meter_id,
    quoted,
)

MAX_IDENTITY_BYTES: Final = 65_536
#: The columns `certs.bulk.write_bulk_csv` writes; `serial` is the certificate's serial.
BULK_REQUIRED: Final = ("meter_id", "alg", "public_key_pem")
BULK_OPTIONAL: Final = ("cert_fingerprint", "serial", "owner_wallet", "kid")


@dataclass(frozen=True, slots=True)
class PkiIdentity:
    """What the PKI knows about an issued meter: its signing key and TLS certificate."""

    key: NewKey
    cert_fingerprint: str
    cert_serial: str


def from_pki(layout: PkiLayout, meter_id: str) -> PkiIdentity:
    """Read `identity.json` (algorithm, certificate) and `signing.pub.pem` (the key)."""
    files = layout.device(check_meter_id(meter_id))
    hint = f"meter {quoted(meter_id)} under {layout.root}: run `meterproof certs issue` first"
    try:
        meta = _read_limited(files.meta, MAX_IDENTITY_BYTES)
        pem = _read_limited(files.signing_pub, MAX_PEM_BYTES)
    except FileNotFoundError as exc:
        raise InvalidInputError(f"no {Path(str(exc.filename)).name} for {hint}") from None
    except OSError as exc:
        raise InvalidInputError(f"cannot read {exc.filename}: {exc.strerror}") from None
    try:
        data = json.loads(meta)
    except ValueError as exc:
        raise InvalidInputError(f"{files.meta} is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("role") != "meter":
        raise InvalidInputError(f"{files.meta} does not describe a meter")
    if data.get("meter_id") != meter_id:
        raise InvalidInputError(f"{files.meta} names another meter")
    return PkiIdentity(
        key=NewKey.parse(_text(data, "alg", files.meta), pem),
        cert_fingerprint=check_fingerprint(_text(data, "sha256_fingerprint", files.meta)),
        cert_serial=check_cert_serial(_text(data, "serial", files.meta)),
    )


def read_bulk(path: Path, *, status: MeterStatus, security_level: SecurityLevel) -> list[NewMeter]:
    """Every row of a bulk CSV as a valid `NewMeter`, or the first bad row's line and why.

    Columns: `meter_id,alg,public_key_pem` and optionally `cert_fingerprint`, `serial` (the
    certificate's), `owner_wallet`, `kid`. A PEM may keep its newlines (quoted cell) or
    write them as the two characters `\\n`, as `certs issue-bulk` does.
    """
    meters: list[NewMeter] = []
    first_line: dict[str, int] = {}
    reader: csv.DictReader[str] | None = None
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            _check_header(reader.fieldnames)
            for row in reader:
                meter = _bulk_row(row, status=status, security_level=security_level)
                seen = first_line.setdefault(meter.meter_id, reader.line_num)
                if seen != reader.line_num:
                    raise InvalidInputError(
                        f"meter id {quoted(meter.meter_id)} repeats line {seen}"
                    )
                meters.append(meter)
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path}: {exc.strerror}") from None
    except (InvalidInputError, csv.Error, UnicodeDecodeError) as exc:
        line = 1 if reader is None else max(reader.line_num, 1)
        raise InvalidInputError(f"{path}, line {line}: {exc}") from None
    if not meters:
        raise InvalidInputError(f"{path} has no rows")
    return meters


def _check_header(fields: object) -> None:
    columns = list(fields) if isinstance(fields, list | tuple) else []
    missing = [name for name in BULK_REQUIRED if name not in columns]
    if missing:
        raise InvalidInputError(f"header lacks column {missing[0]!r}")
    unknown = [name for name in columns if name not in BULK_REQUIRED + BULK_OPTIONAL]
    if unknown:
        raise InvalidInputError(
            f"unknown column {quoted(str(unknown[0]))}; optional ones: {', '.join(BULK_OPTIONAL)}"
        )
    if len(set(columns)) != len(columns):
        raise InvalidInputError("a column appears twice in the header")


def _bulk_row(
    row: dict[str | Any, str | Any], *, status: MeterStatus, security_level: SecurityLevel
) -> NewMeter:
    if None in row:
        raise InvalidInputError("more cells than columns")

    def cell(name: str) -> str | None:
        value = row.get(name)
        if value is None and name in BULK_REQUIRED:
            raise InvalidInputError(f"fewer cells than columns (no {name})")
        return value or None

    meter_id = check_meter_id(cell("meter_id") or "")
    kid = cell("kid")
    fingerprint = cell("cert_fingerprint")
    serial = cell("serial")
    return NewMeter(
        meter_id=meter_id,
        key=NewKey.parse(
            cell("alg") or "", (cell("public_key_pem") or "").replace("\\n", "\n"), kid=kid
        ),
        status=status,
        security_level=security_level,
        owner_wallet=cell("owner_wallet"),
        cert_fingerprint=None if fingerprint is None else check_fingerprint(fingerprint),
        cert_serial=None if serial is None else check_cert_serial(serial),
    )


def _read_limited(path: Path, limit: int) -> bytes:
    with path.open("rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise InvalidInputError(f"{path} is larger than {limit} bytes")
    return data


def _text(data: dict[str, Any], key: str, path: Path) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise InvalidInputError(f"{path}: `{key}` is missing or not a string")
    return value
