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
