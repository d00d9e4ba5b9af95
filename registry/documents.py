"""The canonical texts a wallet (and, for a link, the meter) signs.

Plain UTF-8 lines, `key: value`, in a fixed order after a title line naming the purpose
and version, ending with a newline. A wallet app shows a person exactly what they sign,
and both sides hash the same bytes without any JSON canonicalisation. The title starts
with `meterproof `, while a reading's signing bytes start with `SMR1`
(docs/spec/reading-v1.md section 6), so a meter's signature over one can never be taken
for the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final

from meterproof.registry.errors import InvalidInputError

LINK_WALLET: Final = "link-wallet"
CONSENT: Final = "consent"
CONSENT_REVOKE: Final = "consent-revoke"
#: What a P1 reader signs when it shows a pairing code (registry/pairing.py).
PAIR_READER: Final = "pair-reader"
KINDS: Final = (LINK_WALLET, CONSENT, CONSENT_REVOKE, PAIR_READER)


def render(kind: str, fields: Sequence[tuple[str, str]]) -> str:
    """The document for `kind` with `fields` in the given order."""
    if kind not in KINDS:
        raise InvalidInputError(f"unknown document kind {kind!r}")
    for key, value in fields:
        if "\n" in value or "\r" in value or not key.isidentifier():
            raise InvalidInputError(f"document field {key!r} cannot hold {value[:40]!r}")
    return "".join([f"meterproof {kind} v1\n", *(f"{k}: {v}\n" for k, v in fields)])


def parse(text: str) -> tuple[str, dict[str, str]]:
    """(kind, fields) of a document `render` made; InvalidInputError for anything else."""
    lines = text.split("\n")
    if len(lines) < 2 or lines[-1] != "":
        raise InvalidInputError("a document is lines ending with a newline")
    title = lines[0].split(" ")
    if len(title) != 3 or title[0] != "meterproof" or title[2] != "v1" or title[1] not in KINDS:
        raise InvalidInputError(f"not a meterproof document: {lines[0][:60]!r}")
    fields: dict[str, str] = {}
    for line in lines[1:-1]:
        key, sep, value = line.partition(": ")
        if not sep or key in fields:
            raise InvalidInputError(f"bad document line {line[:60]!r}")
        fields[key] = value
    return title[1], fields


def parse_timestamp(text: str) -> datetime:
    """The inverse of `timestamp` for a time that is given; InvalidInputError otherwise."""
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise InvalidInputError(f"not a document time: {text[:40]!r}") from None


def timestamp(at: datetime | None) -> str:
    """Times in documents: UTC, seconds, `Z`; `-` for none (an open period, no expiry)."""
    if at is None:
        return "-"
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
