"""Split by what the operator does next: fix the input, or look at the registry's state.

Database failures are not translated here: callers already handle `psycopg.Error`.
"""

from __future__ import annotations


class RegistryError(Exception):
    """A one-line explanation for an operator; nothing was written."""


class InvalidInputError(RegistryError, ValueError):
    """A malformed id, label, key, status or CSV row: fix the input and retry."""


class UnknownMeterError(RegistryError, LookupError):
    """No meter with that id is registered."""


class MeterExistsError(RegistryError):
    """The meter id is registered already."""


class StateError(RegistryError):
    """The meter's state forbids the change (a decommissioned meter stays decommissioned)."""
