"""What can go wrong in the PKI, split by what the operator does next."""

from __future__ import annotations


class PkiError(Exception):
    """An operator error with a one-line explanation; nothing was half-written."""


class MissingCaError(PkiError):
    """Run `meterproof certs init` first."""


class IdentityConflictError(PkiError):
    """The name is taken (by any role); pick another one."""


class UnknownIdentityError(PkiError):
    """No identity of that name was issued by this PKI."""
