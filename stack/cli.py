"""`meterproof stack up|down|status|render`: the local stack for demos, benchmarks, hacking.

The servers outlive the command (own sessions, logs in the run dir); `down` finds them
again through the pid files there. Expected failures (a port taken, a missing binary, a
folder PostgreSQL cannot reach) end in one line and a non-zero exit: the group is a
`cli.errors.Group`, so whichever way the group is invoked, none ends in a traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import click

from meterproof.certs.bootstrap import DEFAULT_INGEST_WORKERS
from meterproof.certs.identities import MAX_INGEST_INSTANCES
from meterproof.cli.errors import Group
from meterproof.config import DEFAULT_RUN_DIR
from meterproof.stack.services import LocalStack, Ports

_PORT = click.IntRange(1, 65535)

run_dir_option = click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_RUN_DIR,
    show_default=True,
    help="State of the stack: server data, logs, pid files, stack.env.",
)


def _stack_options(command: Callable[[LocalStack, Ports, int], None]) -> Callable[..., None]:
    """The run dir, PKI, port and worker options, handed to `command` as a stack, its ports
    and the number of ingest worker identities to make sure of."""

    @functools.wraps(command)
    def with_stack(
        *,
        run_dir: Path,
        pki_root: Path | None,
        mqtt_port: int | None,
        mqtt_admin_port: int | None,
        pg_port: int | None,
        redis_port: int | None,
        ingest_workers: int,
        ha: bool = False,
    ) -> None:
        ports = Ports(
            mqtt=mqtt_port, mqtt_admin=mqtt_admin_port, postgres=pg_port, redis=redis_port
        )
        command(LocalStack(run_dir=run_dir, pki_root=pki_root, ha=ha), ports, ingest_workers)

    options = [
        run_dir_option,
        click.option(
            "--pki-root",
            type=click.Path(file_okay=False, path_type=Path),
            help="Operator PKI, created when missing [default: the recorded one, else certs/out].",
        ),
        click.option("--mqtt-port", type=_PORT, help="Mutual-TLS listener port."),
        click.option("--mqtt-admin-port", type=_PORT, help="Plain loopback admin listener port."),
        click.option("--pg-port", type=_PORT, help="PostgreSQL port."),
        click.option("--redis-port", type=_PORT, help="Redis port."),
        click.option(
            "--ingest-workers",
            type=click.IntRange(1, MAX_INGEST_INSTANCES),
            default=DEFAULT_INGEST_WORKERS,
            show_default=True,
            help="Ingest worker certificates (ingest-0, ...) to issue if missing: "
            "`meterproof ingest --workers N` needs N.",
        ),
    ]
    decorated: Callable[..., None] = with_stack
    for option in reversed(options):
        decorated = option(decorated)
    return decorated


@click.group(cls=Group)
def stack() -> None:
    """Mosquitto, PostgreSQL and Redis on loopback, all state under one run dir."""


@stack.command()
@click.option(
    "--ha",
    is_flag=True,
    help="No single point of failure: PostgreSQL with automatic failover (three etcd "
    "members and two nodes under Patroni, synchronous standby) on free ports in RUN_DIR/ha, "
    "and a second broker (RUN_DIR/mosquitto-1); kept once made.",
)
@_stack_options
def up(local: LocalStack, ports: Ports, ingest_workers: int) -> None:
    """Start whatever is not running yet, apply migrations, write RUN_DIR/stack.env.

    A port not given is the one recorded in RUN_DIR/stack.env (the first time: 8883,
    1884, 5432, 6379) if that is free, else a free one. With --ha the database URL names
    both PostgreSQL nodes with target_session_attrs=read-write: clients reach whichever is
    primary, and `stack status` shows which one that is; METERPROOF_MQTT_BROKERS lists
    both brokers (the second, the first time, on the first one's ports + 10 if free, else
    on free ones): meters fail over along it, workers subscribe on each.
    """
    _, started = local.up(ports, ingest_workers=ingest_workers)
    if started:
        click.echo("started " + ", ".join(f"{name} ({s:.2f} s)" for name, s in started.items()))
    else:
        click.echo("already up")
    _echo_status(local)
    click.echo(f"\nsource {local.env_file}")


@stack.command()
@_stack_options
def render(local: LocalStack, ports: Ports, ingest_workers: int) -> None:
    """Create the PKI if missing, render the broker files and the env files; start nothing.

    For compose.yaml: `docker compose --env-file RUN_DIR/compose.env up -d`. Ports are
    chosen as for `up`.
    """
    local.prepare(ports, ingest_workers=ingest_workers)
    click.echo(f"wrote {local.env_file} and {local.compose_env_file}")


@stack.command()
@run_dir_option
@click.option(
    "--purge",
    is_flag=True,
    help="Also delete PostgreSQL's data, which may live outside RUN_DIR (as root, in "
    "~postgres/meterproof when postgres cannot enter RUN_DIR).",
)
def down(run_dir: Path, purge: bool) -> None:
    """Stop the servers recorded in RUN_DIR (their data is kept unless --purge)."""
    from meterproof.stack.chain import stop_dev_chain

    stopped = LocalStack(run_dir=run_dir).down(purge=purge)
    if stop_dev_chain(run_dir):
        stopped.append("ganache")
    click.echo(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")


@stack.command("chain")
@run_dir_option
@click.option("--port", type=_PORT, default=8545, show_default=True, help="JSON-RPC port.")
@click.option(
    "--block-time",
    type=click.FloatRange(0, 60),
    default=1.0,
    show_default=True,
    help="Seconds between blocks; 0 mines one block per transaction.",
)
def chain_command(run_dir: Path, port: int, block_time: float) -> None:
    """Start a local EVM dev node (ganache from node_modules, `make setup`) with the admin
    and oracle accounts of RUN_DIR/evm funded, deploy the GRID contracts once, and write
    RUN_DIR/evm/chain.env: source it after stack.env and the bridge anchors on the chain.
    `stack down` stops the node; its chain is kept in RUN_DIR/chain."""
    from meterproof.stack.chain import start_dev_chain

    chain = start_dev_chain(run_dir, port=port, block_time_s=block_time)
    click.echo(f"ganache {chain.node.url}: GridAnchor {chain.deployment.anchor},"
               f" GRID {chain.deployment.grid}")  # fmt: skip
    click.echo(f"\nsource {chain.env_file}")


@stack.command()
@run_dir_option
def status(run_dir: Path) -> None:
    """Show each server up or down with its address; exit 1 unless all are up."""
    if not _echo_status(LocalStack(run_dir=run_dir)):
        raise SystemExit(1)


def _echo_status(local: LocalStack) -> bool:
    statuses = local.status()
    for service in statuses:
        click.echo(f"{service.name:<11} {'up' if service.running else 'down':<5} {service.address}")
    return all(service.running for service in statuses)
