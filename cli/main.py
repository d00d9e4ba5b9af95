"""Root of the `meterproof` command.

Each group lives in the package that does the work and is imported only when used, so
`meterproof --help` stays instant and a broken optional dependency breaks one group only.
"""

from __future__ import annotations

import importlib
import signal
from types import FrameType

import click

from meterproof.cli.errors import Group
from meterproof.cli.logs import configure_logging

#: command name -> "module:attribute" of a click command or group.
COMMANDS: dict[str, str] = {
    "certs": "meterproof.certs.cli:certs",
    "stack": "meterproof.stack.cli:stack",
    "simulate": "meterproof.meter.cli:simulate",
    "meter": "meterproof.meter.cli:meter",
    "ingest": "meterproof.ingest.cli:ingest",
    "bridge": "meterproof.bridge.cli:bridge",
    "ledger": "meterproof.bridge.cli:ledger",
    "chain": "meterproof.bridge.evm.cli:chain",
    "db": "meterproof.db.cli:db",
    "meters": "meterproof.registry.cli:meters",
    "integrators": "meterproof.consent.cli:integrators",
    "consent": "meterproof.consent.cli:consent",
    "bench": "meterproof.bench.cli:bench",
    "chaos": "meterproof.chaos.cli:chaos",
    "fuzz": "meterproof.fuzz.cli:fuzz",
    "demo": "meterproof.demo.cli:demo",
    "p1": "meterproof.meter.p1.cli:p1",
    "conformance": "meterproof.conformance.cli:conformance",
    "api": "meterproof.api.cli:api",
}


class LazyGroup(Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        command = getattr(importlib.import_module(module_name), attr)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is not a click command")
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="meterproof")
@click.option(
    "--log-level",
    envvar="METERPROOF_LOG_LEVEL",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="Threshold for the log lines written to stderr (JSON unless stderr is a terminal).",
)
def main(log_level: str) -> None:
    """meterproof: signed smart-meter readings, verified, stored and anchored.

    Run `meterproof COMMAND --help` for each command's options.
    """
    configure_logging(level=log_level)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM ends a command as Ctrl-C does. Python's default for it is to die at once,
    which left a terminated `bench` or `conformance` run's PostgreSQL, Redis, Mosquitto
    and workers, or a `demo`'s workers, bridge and API, running without a parent, on ports
    the next run then finds taken. SystemExit unwinds every `with` and `finally` that
    stops them. A second SIGTERM ends the command at once; the services (ingest, bridge,
    api, meter) install handlers of their own, which drain first."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise SystemExit(128 + signum)


def run() -> None:
    """The `meterproof` executable and `python -m meterproof` (tests call `main`, whose
    process keeps its own signal handling)."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    main()
