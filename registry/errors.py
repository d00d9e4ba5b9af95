"""Split by what the operator does next: fix the input, or look at the registry's state.

Database failures are not translated here: callers already handle `psycopg.Error`.
"""

from __future__ import annotations

from meterproof.errors import ConflictError, InputError, MeterproofError, NotFoundError


class RegistryError(MeterproofError):
    """A one-line explanation for an operator; nothing was written."""


class InvalidInputError(RegistryError, InputError):
    """A malformed id, label, key, status or CSV row: fix the input and retry."""


class UnknownMeterError(RegistryError, NotFoundError):
    """No meter with that id is registered."""


class MeterExistsError(RegistryError, ConflictError):
    """The meter id is registered already."""


class StateError(RegistryError, ConflictError):
    """The meter's state forbids the change (a decommissioned meter stays decommissioned);
    `code` is its stable reason code, as a `RefusedError`'s.

    The refusal is recorded (`record_refusal`) and nothing else changed.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class RefusedError(RegistryError, InputError):
    """A proof, challenge or grant that is refused; `code` is its stable reason code.

    The refusal is recorded (security or consent events) and nothing else changed.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
