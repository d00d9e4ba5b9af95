"""The root of every error meterproof raises on purpose, split by what the caller does next.

A command maps any of these to one line and an exit code in one place (`cli.main`);
library exceptions are translated where they are caught, at the adapter. The wire
contract (`schemas`) imports nothing of ours, so its two errors stay `ValueError`s and
are translated into reason codes by their callers, never shown to an operator as such.
"""

from __future__ import annotations


class MeterproofError(Exception):
    """Something an operator can act on, with a one-line explanation; nothing half-done."""

    #: the process exit code a command ends with
    exit_code: int = 1


class InputError(MeterproofError, ValueError):
    """Bad input (an id, a path, a file's contents): fix it and run again."""

    exit_code = 2


class NotFoundError(MeterproofError, LookupError):
    """What the input names does not exist (no such meter, identity, batch)."""


class ConflictError(MeterproofError):
    """The state forbids the change (the name is taken, the meter is decommissioned)."""


class UnavailableError(MeterproofError):
    """A dependency (database, broker, Redis, ledger) did not answer; retry later.

    Inside a long-running process this is transient: retried with backoff, and nothing
    is acknowledged meanwhile.
    """

    exit_code = 75  # EX_TEMPFAIL: a supervisor may try again

    def __init__(self, dependency: str, detail: str) -> None:
        super().__init__(f"{dependency}: {detail}")
        self.dependency = dependency


def first_line(exc: BaseException) -> str:
    """An exception's message as one line (a database's error spans several)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
