"""The one seam to the device registry: a worker rejects readings of unregistered meters
(`unknown_meter`), so meters the simulator issues are registered before they report.

A `Registrar` takes the bulk CSV that `certs.write_bulk_csv` wrote (the file
`meterproof meters register --bulk` reads) and returns how many meters it registered.
`meterproof demo` may pass its own; the simulator's default is the stack's registry.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psycopg

from meterproof.errors import MeterproofError

Registrar = Callable[[Path], int]


class RegistrationError(MeterproofError):
    """The registry refused or could not be reached; the message says what to run."""


def register_command(csv_path: Path) -> str:
    """What to run by hand when the simulator does not register the meters itself."""
    return f"meterproof meters register --bulk {csv_path}"


def stack_registrar(database_url: str) -> Registrar:
    """Register every meter of the CSV as `active`, all or none, in one transaction."""

    def register(csv_path: Path) -> int:
        from meterproof.registry import repository, sources
        from meterproof.registry.errors import RegistryError
        from meterproof.registry.model import MeterStatus, SecurityLevel

        try:
            rows = sources.read_bulk(
                csv_path, status=MeterStatus.ACTIVE, security_level=SecurityLevel.STANDARD
            )
            with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
                repository.register(conn, rows)
        except (RegistryError, psycopg.Error) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise RegistrationError(
                f"registering {csv_path} failed ({first_line}); "
                f"run `{register_command(csv_path)}` once the registry is up"
            ) from exc
        return len(rows)

    return register
