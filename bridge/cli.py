"""`meterproof bridge` (the long-running process) and `meterproof ledger` (audit tools)."""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson
import psycopg

from meterproof.bridge.settings import BridgeSettings
from meterproof.certs.layout import PkiLayout
from meterproof.cli.errors import Group
from meterproof.cli.options import database_option, load_settings
from meterproof.errors import MeterproofError, first_line
from meterproof.schemas.signatures import InvalidKeyError

F = TypeVar("F", bound=Callable[..., Any])
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


def _settings(**overrides: Any) -> BridgeSettings:  # noqa: ANN401 - click option values
    """Command-line values win over the environment, `.run/stack.env` and the TOML file."""
    return load_settings(BridgeSettings, **overrides)


def _connect(url: str) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        raise click.ClickException(f"database unreachable: {first_line(exc)}") from None


@click.command()
@click.option(
    "--epoch-seconds",
    type=click.IntRange(1, 86_400),
    default=None,
    help="Epoch length, aligned to the wall clock [setting epoch_seconds, default 900].",
)
@click.option(
    "--seal-delay",
    type=click.FloatRange(0, 3600),
    default=None,
    help="Seconds after an epoch ends before it is sealed [seal_delay_s, default 30].",
)
@click.option(
    "--claim-interval",
    type=click.FloatRange(0.01, 600),
    default=None,
    help="Seconds between claims while an epoch is open [claim_interval_s, default 5].",
)
@click.option(
    "--once",
    is_flag=True,
    help="One pass (claim, seal what is due, anchor what is pending, publish), then exit;"
    " exit 1 if the database could not be reached.",
)
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    envvar="METERPROOF_CONFIG",
    help="TOML file of settings (see docs/anchoring.md).",
)
def bridge(
    epoch_seconds: int | None,
    seal_delay: float | None,
    claim_interval: float | None,
    once: bool,
    config: str | None,
) -> None:
    """Anchor stored readings: claim them into epoch batches, seal each closed epoch into a
    signed ledger entry (Merkle root + GRID mints), submit it to the ledger exactly once and
    publish a summary on ledger/epochs of every broker (METERPROOF_MQTT_BROKERS).

    Settings come from METERPROOF_* variables, .run/stack.env and --config. SIGTERM ends
    the current pass and exits; a batch left pending is anchored by the next start.
    """
    from meterproof.bridge.oracle import load_oracle
    from meterproof.bridge.publish import EveryBroker
    from meterproof.bridge.runner import Runner
    from meterproof.bridge.sinks import open_sink
    from meterproof.probes import serve_probes

    if config:
        os.environ["METERPROOF_CONFIG"] = config
    settings = _settings(
        epoch_seconds=epoch_seconds, seal_delay_s=seal_delay, claim_interval_s=claim_interval
    )
    layout = PkiLayout(settings.pki_root)
    try:
        oracle = load_oracle(layout.oracle_key)
    except InvalidKeyError as exc:
        raise click.ClickException(str(exc)) from None
    identity = layout.service("bridge")
    if not identity.cert.is_file():
        raise click.ClickException(f"no bridge identity in {identity.directory}: run `certs init`")
    try:
        sink = open_sink(settings, trusted_key=oracle.public_key)
    except MeterproofError as exc:
        raise click.ClickException(str(exc)) from None
    publisher = EveryBroker.of(
        settings.brokers(),
        ca_cert=layout.ca_cert,
        identity=identity,
        client_id=settings.mqtt_client_id,
        topic=settings.summary_topic,
    )
    publisher.start()
    runner = Runner(settings, sink=sink, oracle=oracle, publisher=publisher)
    if once:
        runner.run_once()
        reached = runner.ready()
        runner.close()
        publisher.close(flush_s=5.0)
        if not reached:  # nothing claimed, sealed or anchored: not a pass that succeeded
            raise click.ClickException("database unreachable: nothing was done (see the log)")
        return
    probes = serve_probes(settings.metrics_host, settings.metrics_port, ready=runner.ready)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    runner.run(stop)
    publisher.close(flush_s=2.0)
    if probes is not None:
        probes.close()


@click.group(cls=Group)
def ledger() -> None:
    """Audit the ledger: verify it against the readings, prove a reading's inclusion,
    check a proof offline, list entries and GRID balances."""


def _oracle_option(command: F) -> F:
    return click.option(
        "--oracle-pub",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="The published oracle public key (PEM) [default: <pki_root>/oracle/oracle.pub.pem].",
    )(command)


def _trusted_key(oracle_pub: Path | None, *, required: bool) -> bytes | None:
    from meterproof.bridge.oracle import load_oracle_public

    path = oracle_pub or PkiLayout(_settings().pki_root).oracle_pub
    if oracle_pub is None and not path.is_file() and not required:
        return None
    try:
        return load_oracle_public(path)
    except InvalidKeyError as exc:
        raise click.ClickException(f"{exc}; pass --oracle-pub") from None


@ledger.command("verify")
@database_option
@_oracle_option
def verify_command(database_url: str | None, oracle_pub: Path | None) -> None:
    """Recompute every root, the hash chain, every signature, every mint and balance from
    the stored readings; with the `evm` sink, also every anchor, claim tree, mint per wallet
    and the total supply against the chain. Print OK or the first discrepancy (exit 1)."""
    from meterproof.bridge.mint import format_grid
    from meterproof.bridge.oracle import describe
    from meterproof.bridge.verify import BRIDGE_RECORD, LOCAL_LEDGER, verify

    trusted = _trusted_key(oracle_pub, required=True)
    assert trusted is not None
    settings = _settings()
    url = database_url or settings.database_url
    source = BRIDGE_RECORD if settings.sink == "evm" else LOCAL_LEDGER
    try:
        with _connect(url) as conn, _connect(url) as ledger_conn:
            report = verify(conn, ledger_conn, trusted, source=source)
            chain = _audit_chain(conn, settings) if report.discrepancy is None else None
    except psycopg.OperationalError as exc:
        raise click.ClickException(f"database unreachable: {first_line(exc)}") from None
    if report.discrepancy is not None:
        click.echo(f"DISCREPANCY {report.discrepancy}")
        sys.exit(1)
    if chain is not None and chain.discrepancy is not None:
        click.echo(f"DISCREPANCY chain: {chain.discrepancy}")
        sys.exit(1)
    wallets = f"{report.wallets} wallet balances" if chain is None else "balances on chain"
    click.echo(
        f"OK {report.entries} entries, {report.anchored_readings} anchored readings"
        f" ({report.rehashed} rehashed), {format_grid(report.minted_units)} GRID minted,"
        f" {wallets}; oracle {describe(trusted)}"
    )
    if chain is not None:
        click.echo(
            f"OK chain: {chain.batches} anchors"
            f"{f' ({chain.unmarked} not yet marked anchored)' if chain.unmarked else ''},"
            f" {chain.wallets} wallets,"
            f" {format_grid(chain.direct_units)} GRID minted directly,"
            f" {format_grid(chain.claim_units)} in claim trees"
            f" ({format_grid(chain.claimed_units)} claimed),"
            f" total supply {format_grid(chain.total_supply)}"
        )


def _audit_chain(conn: psycopg.Connection[Any], settings: BridgeSettings) -> Any:  # noqa: ANN401
    """The chain audit of the `evm` sink (a ChainReport), None for the local sink."""
    if settings.sink != "evm":
        return None
    from meterproof.bridge.evm.audit import audit_chain
    from meterproof.bridge.evm.client import Deployment, connect

    try:
        w3 = connect(settings.evm_rpc_url, timeout_s=settings.sink_timeout_s)
        return audit_chain(conn, w3, Deployment.load(settings.evm_contracts_file))
    except MeterproofError as exc:
        raise click.ClickException(str(exc)) from None


@ledger.command("proof")
@click.argument("reading_hash")
@click.option(
    "-o", "--output", type=click.File("wb"), default="-", help="Write the JSON here [stdout]."
)
@database_option
def proof_command(reading_hash: str, output: Any, database_url: str | None) -> None:  # noqa: ANN401
    """The RFC 6962 audit path of READING_HASH (64 hex digits) to its batch root, with the
    signed ledger entry, as JSON; check it with `ledger check-proof`."""
    from meterproof.bridge.proof import ProofError, build_proof

    if not _HASH_RE.fullmatch(reading_hash):
        raise click.BadParameter("expected 64 lowercase hex digits", param_hint="READING_HASH")
    with _connect(database_url or _settings().database_url) as conn:
        try:
            proof = build_proof(conn, bytes.fromhex(reading_hash))
        except ProofError as exc:
            raise click.ClickException(str(exc)) from None
    output.write(orjson.dumps(proof, option=orjson.OPT_INDENT_2) + b"\n")


@ledger.command("check-proof")
@click.argument("file", type=click.File("rb"))
@_oracle_option
def check_proof_command(file: Any, oracle_pub: Path | None) -> None:  # noqa: ANN401
    """Check an inclusion proof offline (FILE, or - for stdin): audit path, root, header,
    entry hash and oracle signature. Exit 1 if anything does not hold."""
    from meterproof.bridge.oracle import describe
    from meterproof.bridge.proof import ProofError, check_proof

    trusted = _trusted_key(oracle_pub, required=False)
    try:
        checked = check_proof(orjson.loads(file.read()), trusted_key=trusted)
    except orjson.JSONDecodeError as exc:
        raise click.ClickException(f"not JSON: {exc}") from None
    except ProofError as exc:
        click.echo(f"INVALID {exc}")
        sys.exit(1)
    pinned = "the trusted key" if trusted else "NOT pinned: compare it with the published key"
    click.echo(
        f"OK leaf {checked.leaf_index} of {checked.tree_size} in batch {checked.batch};"
        f" signed by {describe(checked.oracle_key)} ({pinned})"
    )


@ledger.command("balances")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
@database_option
def balances_command(as_json: bool, database_url: str | None) -> None:
    """GRID per wallet in the local ledger (1 GRID = 1 kWh exported, 18 decimals)."""
    from meterproof.bridge.ledger.local import balances
    from meterproof.bridge.mint import format_grid

    with _connect(database_url or _settings().database_url) as conn:
        found = balances(conn)
    if as_json:
        view = [
            {
                "wallet": b.wallet,
                "grid_units": str(b.grid_units),
                "grid": format_grid(b.grid_units),
                "last_entry": b.last_entry,
            }
            for b in found
        ]
        click.echo(orjson.dumps(view, option=orjson.OPT_INDENT_2).decode())
        return
    if not found:
        click.echo("no GRID minted yet")
        return
    click.echo(f"{'wallet':<40} {'GRID':>28} {'last entry':>10}")
    for b in found:
        click.echo(
            f"{b.wallet or '(no wallet)':<40} {format_grid(b.grid_units):>28} {b.last_entry:>10}"
        )


@ledger.command("entries")
@click.option(
    "--limit",
    type=click.IntRange(1, 10_000),
    default=20,
    show_default=True,
    help="How many of the newest entries to show (oldest of them first).",
)
@click.option("--json", "as_json", is_flag=True, help="JSON with headers, signatures and mints.")
@database_option
def entries_command(limit: int, as_json: bool, database_url: str | None) -> None:
    """The most recent ledger entries, and the oracle public key that signs them."""
    from meterproof.bridge.entry import entry_json
    from meterproof.bridge.ledger.local import recent_entries
    from meterproof.bridge.mint import format_grid
    from meterproof.bridge.oracle import describe

    published = _trusted_key(None, required=False)
    with _connect(database_url or _settings().database_url) as conn:
        recorded = recent_entries(conn, limit=limit)
        waiting = conn.execute(
            "SELECT status, count(*) FROM bridge_batches WHERE status <> 'anchored' GROUP BY 1"
        ).fetchall()
    if as_json:
        view = {
            "oracle_key": describe(published) if published else None,
            "entries": [
                {**entry_json(r.entry), "recorded_at_ms": r.recorded_at_ms} for r in recorded
            ],
            "bridge": {str(status): int(n) for status, n in waiting},
        }
        click.echo(orjson.dumps(view, option=orjson.OPT_INDENT_2).decode())
        return
    if published is not None:
        click.echo(f"oracle key (published): {describe(published)}")
    else:
        keys = ", ".join(map(describe, sorted({r.entry.header.oracle_key for r in recorded})))
        click.echo(f"oracle key (from the entries; no published key found): {keys or '-'}")
    click.echo(
        f"{'batch':>6} {'epoch start (UTC)':<20} {'readings':>9} {'mints':>6} {'GRID':>20}"
        f"  {'entry hash':<16} {'merkle root':<16}"
    )
    for r in recorded:
        h = r.entry.header
        start = datetime.fromtimestamp(h.epoch_start_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
        signer = (
            "" if published in (None, h.oracle_key) else f"  signed by {describe(h.oracle_key)}"
        )
        click.echo(
            f"{h.batch:>6} {start:<20} {h.reading_count:>9} {len(r.entry.mints):>6}"
            f" {format_grid(r.entry.minted_units):>20}  {h.entry_hash.hex()[:16]:<16}"
            f" {h.merkle_root.hex()[:16]:<16}{signer}"
        )
    if not recorded:
        click.echo("(no entries yet)")
    for status, n in waiting:
        click.echo(f"bridge: {n} batch(es) {status}")
