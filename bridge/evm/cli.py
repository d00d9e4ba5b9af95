"""`meterproof chain`: compile the GRID contracts, deploy them, check a reading's proof
with the contract's view (an eth_call, as anyone can)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import orjson

from meterproof.cli.errors import Group
from meterproof.errors import MeterproofError


@click.group(cls=Group)
def chain() -> None:
    """GRID on an EVM chain: the contracts of the `evm` ledger sink (docs/anchoring.md).

    The node URL, chain id, key and contracts files are the bridge's settings
    (METERPROOF_EVM_RPC_URL, METERPROOF_EVM_ORACLE_KEY_FILE, METERPROOF_EVM_CONTRACTS_FILE).
    """


def _bridge_settings() -> Any:  # noqa: ANN401 - BridgeSettings, imported lazily
    from meterproof.bridge.cli import _settings

    return _settings()


@chain.command("compile")
def compile_command() -> None:
    """Recompile contracts/*.sol with the npm solc and rewrite the committed artifacts."""
    from meterproof.bridge.evm.compile import compile_contracts, write_artifacts

    try:
        written = write_artifacts(compile_contracts())
    except MeterproofError as exc:
        raise click.ClickException(str(exc)) from None
    for path in written:
        click.echo(f"wrote {path}")


@chain.command("deploy")
@click.option(
    "--admin-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path(".run/evm/admin.key"),
    show_default=True,
    help="0x private key of the admin (may rotate the oracle); created when missing.",
)
def deploy_command(admin_key_file: Path) -> None:
    """Deploy GridAnchor (it creates GRID) naming the oracle account, and write the
    contracts file the bridge reads. Both accounts need ether for gas on the chain."""
    from meterproof.bridge.evm.client import connect, load_key, new_key
    from meterproof.bridge.evm.deploy import deploy

    s = _bridge_settings()
    try:
        admin = load_key(admin_key_file) if admin_key_file.exists() else new_key(admin_key_file)
        oracle_file = s.evm_oracle_key_file
        oracle = load_key(oracle_file) if oracle_file.exists() else new_key(oracle_file)
        w3 = connect(s.evm_rpc_url, timeout_s=max(s.sink_timeout_s, 30))
        deployment = deploy(w3, admin, oracle.address)
    except MeterproofError as exc:
        raise click.ClickException(str(exc)) from None
    if deployment.chain_id != s.evm_chain_id:
        raise click.ClickException(
            f"the node is chain {deployment.chain_id}, the setting evm_chain_id is"
            f" {s.evm_chain_id}: nothing written"
        )
    deployment.save(s.evm_contracts_file)
    click.echo(f"GridAnchor {deployment.anchor}, GRID {deployment.grid} on chain"
               f" {deployment.chain_id} (block {deployment.block})")  # fmt: skip
    click.echo(f"admin {admin.address}, oracle {oracle.address}; wrote {s.evm_contracts_file}")


@chain.command("check-proof")
@click.argument("file", type=click.File("rb"))
def check_proof_command(file: Any) -> None:  # noqa: ANN401 - a click file
    """Ask the contract's view whether the reading of a `ledger proof` FILE (- for stdin)
    is in its anchored batch; exit 1 if the chain says no."""
    import sys

    from meterproof.bridge.evm.client import Deployment, connect, contracts, node_call

    s = _bridge_settings()
    try:
        proof = orjson.loads(file.read())
        batch, leaf = int(proof["entry"]["batch"]), bytes.fromhex(proof["reading_hash"])
        path = [bytes.fromhex(p) for p in proof["audit_path"]]
        index = int(proof["leaf_index"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise click.ClickException(f"not a meterproof inclusion proof: {exc}") from None
    try:
        deployment = Deployment.load(s.evm_contracts_file)
        anchor, _ = contracts(connect(s.evm_rpc_url, timeout_s=s.sink_timeout_s), deployment)
        included = node_call(
            lambda: anchor.functions.verifyReading(batch, leaf, index, path).call()
        )
    except MeterproofError as exc:
        raise click.ClickException(str(exc)) from None
    if not included:
        click.echo(f"INVALID GridAnchor {deployment.anchor} does not accept it for batch {batch}")
        sys.exit(1)
    click.echo(
        f"OK GridAnchor {deployment.anchor}.verifyReading: leaf {index} of batch {batch}"
        f" on chain {deployment.chain_id}"
    )


@chain.command("release")
def release_command() -> None:
    """Send the GRID that waits in claim trees for meters without an EVM wallet at sealing
    to the EVM wallet each has linked since (the oracle attests the link)."""
    import psycopg

    from meterproof.bridge.evm.client import Deployment, connect, load_key
    from meterproof.bridge.evm.release import release_linked
    from meterproof.bridge.mint import format_grid
    from meterproof.errors import first_line

    s = _bridge_settings()
    try:
        deployment = Deployment.load(s.evm_contracts_file)
        oracle = load_key(s.evm_oracle_key_file)
        w3 = connect(s.evm_rpc_url, timeout_s=s.sink_timeout_s)
        with psycopg.connect(s.database_url, autocommit=True, connect_timeout=5) as conn:
            released = release_linked(conn, w3, deployment, oracle, timeout_s=60)
    except psycopg.OperationalError as exc:
        raise click.ClickException(f"database unreachable: {first_line(exc)}") from None
    except MeterproofError as exc:
        raise click.ClickException(str(exc)) from None
    for r in released:
        click.echo(f"batch {r.batch} leaf {r.index} ({r.meter_id}): {format_grid(r.units)} GRID"
                   f" to {r.to} in {r.tx_hash}")  # fmt: skip
    click.echo(f"{len(released)} leaves released")
