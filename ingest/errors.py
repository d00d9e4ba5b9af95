"""Split by what the caller does next: a rejection is stored and acknowledged (it carries a
spec reason, see `records.Rejection`); a transient failure is retried and never acknowledged."""

from __future__ import annotations


class TransientError(Exception):
    """A dependency failed; the batch is retried, nothing is acknowledged meanwhile."""

    def __init__(self, dependency: str, detail: str) -> None:
        super().__init__(f"{dependency}: {detail}")
        self.dependency = dependency
