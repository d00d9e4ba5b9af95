"""`meterproof p1`: read a DSMR P1 port as a signing meter (`run`), check a recording
without publishing anything (`parse`), or pair the reader with its owner's wallet (`pair`).

Exit status of `parse`: 0 when at least one telegram parsed, 1 when none did, 2 bad
arguments. Of `run`: 0 every published reading receipted, 2 bad arguments, 3 readings
still unreceipted after --receipt-timeout (kept in the outbox for the next run). Of
`pair`: 0 the link document signed, 1 the code expired or was refused, 2 bad arguments.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import timedelta
from pathlib import Path

import click

from meterproof.certs.layout import PkiLayout, check_identity
from meterproof.cli.errors import Group
from meterproof.cli.options import connect_database, stack_env_option
from meterproof.config import StackEnv
from meterproof.errors import InputError
from meterproof.meter.client import Broker, ClientSettings
from meterproof.meter.identity import MeterIdentity
from meterproof.meter.p1.pairing import SIGNED
from meterproof.meter.p1.pairing import pair as pair_reader
from meterproof.meter.p1.reader import ReaderSettings, run_p1
from meterproof.meter.p1.sources import (
    FileSource,
    SerialSource,
    Source,
    TcpSource,
    parse_host_port,
)
from meterproof.meter.p1.telegram import Decoded, Outcome, TelegramDecoder, Version
from meterproof.meter.simulate import EXIT_UNRECEIPTED

EXIT_NOTHING_PARSED = 1

_version_option = click.option(
    "--dsmr-version",
    "version",
    type=click.Choice([v.value for v in Version]),
    default=Version.AUTO.value,
    show_default=True,
    help="Telegram specification: 2.2, 3, 4, 5, 5B (Belgian e-MUCS), 5L (Luxembourg "
    "Smarty); auto tells them apart per telegram. A serial port runs at 9600 7E1 for "
    "2.2 and 3, else at 115200 8N1.",
)
_key_option = click.option(
    "--smarty-key",
    metavar="HEX",
    envvar="METERPROOF_SMARTY_KEY",
    help="The meter's 16-byte AES key (32 hex digits, from the grid operator): the "
    "telegrams are Smarty general-global-cipher frames. Prefer $METERPROOF_SMARTY_KEY: "
    "other users see command lines (ps), not environments.",
)


def _decoder(version: str, smarty_key: str | None) -> TelegramDecoder:
    try:
        key = None if smarty_key is None else bytes.fromhex(smarty_key)
        return TelegramDecoder(version=Version(version), key=key)
    except ValueError as exc:
        raise InputError(f"--smarty-key: {exc}") from None


@click.group(cls=Group)
def p1() -> None:
    """A DSMR P1 reader (Dutch, Belgian, Luxembourg smart meters) that signs readings."""


@p1.command("parse")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per telegram.")
@_version_option
@_key_option
def parse(*, file: Path, as_json: bool, version: str, smarty_key: str | None) -> None:
    """Parse every telegram of a recorded FILE; publish nothing.

    Each telegram gives one line: accepted ones with import_wh, export_wh, ts (unix ms
    UTC, null when the telegram has no time) and power_w; refused ones with an error
    reason (crc_mismatch, crc_missing, truncated, unparsable, missing_register,
    decrypt_failed). Skipped bytes between telegrams are counted on stderr.
    """
    decoder = _decoder(version, smarty_key)
    data = file.read_bytes()
    results = decoder.feed(data) + decoder.finish()
    for decoded in results:
        click.echo(json.dumps(_as_json(decoded)) if as_json else _as_line(decoded))
    accepted = sum(d.outcome is Outcome.ACCEPTED for d in results)
    click.echo(
        f"{len(results)} telegrams, {accepted} parsed, "
        f"{decoder.garbage_bytes} bytes skipped between them",
        err=True,
    )
    sys.exit(0 if accepted else EXIT_NOTHING_PARSED)


def _as_json(decoded: Decoded) -> dict[str, object]:
    if decoded.reading is None:
        return {"error": decoded.outcome.value, "detail": decoded.detail, "sha256": decoded.sha256}
    return {**decoded.reading.to_json(), "sha256": decoded.sha256}


def _as_line(decoded: Decoded) -> str:
    reading = decoded.reading
    if reading is None:
        return f"refused {decoded.outcome.value}: {decoded.detail}"
    return (
        f"DSMR {reading.version.value} ts={reading.ts} import_wh={reading.import_wh} "
        f"export_wh={reading.export_wh} power_w={reading.power_w}"
    )


def _meter_id(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    try:
        return check_identity(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@p1.command("run")
@click.option("--serial", metavar="DEVICE", help="A serial port, e.g. /dev/ttyUSB0.")
@click.option("--tcp", metavar="HOST:PORT", help="A TCP stream (ser2net-style adapters).")
@click.option(
    "--file",
    "path",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="A recording, read once.",
)
@click.option(
    "--meter-id",
    required=True,
    callback=_meter_id,
    help="The reader's device identity in the PKI folder: it signs every reading.",
)
@_version_option
@_key_option
@click.option(
    "--interval",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="Publish at most one reading per this many seconds of telegram time.",
)
@click.option(
    "--receipt-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds to wait for the last receipts once reading stops.",
)
@click.option(
    "--republish-after",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Republish a reading with no receipt this many seconds after the broker took it "
    "(doubling per attempt; the ingest side deduplicates).",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Seq state, outbox and telegram journal; keep it: a new empty one restarts seq at 1,"
    " refused as seq_reused (docs/p1.md)  [default: <run dir>/meters/<meter id>]",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="Serve /metrics, /healthz and /readyz on 127.0.0.1 at this port; 0: off.",
)
@stack_env_option
def run(
    *,
    serial: str | None,
    tcp: str | None,
    path: Path | None,
    meter_id: str,
    version: str,
    smarty_key: str | None,
    interval: float,
    receipt_timeout: float,
    republish_after: float,
    state_dir: Path | None,
    metrics_port: int,
    stack_env: Path,
) -> None:
    """Read telegrams from one source, sign each accepted one as --meter-id and publish
    it through the reference meter client (outbox, receipts, republish).

    Runs until SIGINT/SIGTERM, or the end of a --file. A dropped port or stream is
    reopened with backoff; what the broker did not receipt stays in the outbox.
    """
    chosen = [name for name, value in (("--serial", serial), ("--tcp", tcp), ("--file", path))
              if value is not None]  # fmt: skip
    if len(chosen) != 1:
        raise InputError("give exactly one of --serial, --tcp, --file")
    decoder = _decoder(version, smarty_key)
    source: Source
    if serial is not None:
        source = SerialSource(serial, Version(version))
    elif tcp is not None:
        source = TcpSource(*parse_host_port(tcp))
    else:
        assert path is not None
        source = FileSource(path)
    try:
        settings = ReaderSettings(interval_s=interval, receipt_timeout_s=receipt_timeout)
        client_settings = ClientSettings(republish_after_s=republish_after)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    env = StackEnv.load(stack_env)
    identity = MeterIdentity.load(PkiLayout(env.pki_root).device(meter_id))
    result = asyncio.run(
        run_p1(
            identity,
            broker=Broker.from_env(env),
            state_dir=state_dir or env.run_dir / "meters" / meter_id,
            source=source,
            decoder=decoder,
            settings=settings,
            client_settings=client_settings,
            metrics_port=metrics_port,
        )
    )
    refused = {k: v for k, v in sorted(result.p1.outcomes.items()) if k != Outcome.ACCEPTED}
    click.echo(
        f"p1 {meter_id}: published {result.p1.published}, not published {refused or 'none'}, "
        f"skipped bytes {result.p1.garbage_bytes}; receipts: accepted {result.client.accepted}, "
        f"duplicate {result.client.duplicate}, rejected {dict(result.client.rejected)}; "
        f"unreceipted {result.unreceipted}"
    )
    sys.exit(EXIT_UNRECEIPTED if result.unreceipted else 0)


@p1.command("pair")
@click.option(
    "--meter-id",
    required=True,
    callback=_meter_id,
    help="The reader's device identity in the PKI folder: it signs the offer and the link.",
)
@click.option(
    "--valid-for",
    type=click.IntRange(5, 1800),
    default=600,
    show_default=True,
    help="Seconds the code can be entered.",
)
@stack_env_option
def pair(*, meter_id: str, valid_for: int, stack_env: Path) -> None:
    """Show a one-time pairing code and sign the owner's wallet link when they enter it.

    The owner enters the code where they link a wallet; the code names this reader, and
    this command then signs the resulting link document with the device key (after
    checking it links this reader under this code). The owner's wallet signature over the
    same document completes the link, so the code alone links nothing. A code is used
    once and lives --valid-for seconds. Runs against the stack's registry database.
    """
    env = StackEnv.load(stack_env)
    identity = MeterIdentity.load(PkiLayout(env.pki_root).device(meter_id))
    with connect_database(env.database_url) as conn:
        result = pair_reader(identity, conn, ttl=timedelta(seconds=valid_for), show=click.echo)
    if result.outcome != SIGNED:
        click.echo(f"pairing ended: {result.outcome}", err=True)
        sys.exit(1)
