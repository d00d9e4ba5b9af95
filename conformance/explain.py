"""The signing bytes of one reading, field by field: what a vendor compares against when
a signature does not verify. The worked example of docs/spec/reading-v1.md is this
module's table for the first test vector (`python -P -m meterproof conformance explain`)."""

from __future__ import annotations

from dataclasses import dataclass

from meterproof.schemas.reading import OPTIONAL_FIELDS, SignedReading
from meterproof.schemas.signing import MAGIC, reading_hash, signing_bytes


@dataclass(frozen=True, slots=True)
class Span:
    """`size` bytes at `offset` of the signing bytes, and what they encode."""

    offset: int
    size: int
    hex: str
    meaning: str


def spans(reading: SignedReading) -> list[Span]:
    """Every field of the signing bytes in order; the hex of all spans joined is exactly
    `signing_bytes(reading).hex()`."""
    data = signing_bytes(reading)
    meter_id = reading.meter_id.encode("ascii")
    present = [
        (bit, name)
        for bit, name in enumerate(OPTIONAL_FIELDS)
        if getattr(reading, name) is not None
    ]
    mask = sum(1 << bit for bit, _ in present)
    layout: list[tuple[int, str]] = [
        (len(MAGIC), f"magic {MAGIC.decode('ascii')!r}"),
        (1, f"meter_id length = {len(meter_id)}"),
        (len(meter_id), f"meter_id {reading.meter_id!r} (ASCII)"),
        (8, f"seq = {reading.seq} (unsigned)"),
        (8, f"ts = {reading.ts} ms (unsigned)"),
        (8, f"import_wh = {reading.import_wh} (unsigned)"),
        (8, f"export_wh = {reading.export_wh} (unsigned)"),
        (1, f"optional-field mask = 0b{mask:08b}"),
    ]
    layout += [
        (8, f"{name} = {getattr(reading, name)} (bit {bit}, signed)") for bit, name in present
    ]
    out: list[Span] = []
    offset = 0
    for size, meaning in layout:
        out.append(Span(offset, size, data[offset : offset + size].hex(), meaning))
        offset += size
    return out


def markdown(reading: SignedReading) -> str:
    """The byte table, the whole signing bytes as hex, and the reading_hash, in Markdown."""
    data = signing_bytes(reading)
    rows = [
        "| offset | bytes | hex | content |",
        "|---:|---:|---|---|",
        *(f"| {s.offset} | {s.size} | `{s.hex}` | {s.meaning} |" for s in spans(reading)),
    ]
    full = data.hex()
    wrapped = "\n".join(full[i : i + 64] for i in range(0, len(full), 64))
    return "\n".join(
        [
            *rows,
            "",
            f"All {len(data)} signing bytes:",
            "",
            "```hex",
            wrapped,
            "```",
            "",
            f"`reading_hash` = `{reading_hash(data).hex()}`",
        ]
    )
