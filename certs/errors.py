"""What can go wrong in the PKI, split by what the operator does next."""

from __future__ import annotations

from meterproof.errors import ConflictError, MeterproofError, NotFoundError


class PkiError(MeterproofError):
    """An operator error with a one-line explanation; nothing was half-written."""


class MissingCaError(PkiError, NotFoundError):
    """Run `meterproof certs init` first."""


class IdentityConflictError(PkiError, ConflictError):
    """The name is taken (by any role); pick another one."""


class UnknownIdentityError(PkiError, NotFoundError):
    """No identity of that name was issued by this PKI."""


class SharedKeyError(PkiError):
    """A private key file its group or others have access to: whoever could read it may
    hold what it proves (a meter, an account). Its message leaves the path to the caller."""
