"""P1 bytes -> framed telegrams -> `P1Reading`s or refusals, with no I/O (sans-I/O).

dsmr_parser does the OBIS parsing, the CRC16 check, the S/W telegram time and the
Smarty decryption. Framing is ours: dsmr_parser's `TelegramBuffer` silently drops a
telegram cut short by the next '/' and any noise before it, and a reader must count
both. A framed telegram becomes exactly one `Decoded`, accepted or with an `Outcome`.

Mapping (the DSMR registers come as kWh/kW with three decimals and V/A; all conversions
are exact `Decimal` arithmetic, never float):

- `import_wh` = 1.8.1 + 1.8.2 (or the total 1.8.0 when the meter has no tariffs, as
  Smarty), `export_wh` = 2.8.1 + 2.8.2 (or 2.8.0);
- `power_w` = 1.7.0 - 2.7.0: the net over all phases, positive when importing;
- `voltage_mv` / `current_ma` = phase L1 (32.7.0 / 31.7.0): the wire contract has one
  field each; L2 and L3 stay in `P1Reading.voltages_mv` / `currents_ma`;
- `ts` = 0-0:1.0.0, Dutch local time, in UTC milliseconds (its S/W flag tells the two
  02:30s of the autumn DST change apart); None when the telegram has no time (DSMR
  2.2/3): the reader then uses its own clock.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from functools import cache
from typing import Any, Final

from dsmr_parser import telegram_specifications as specs
from dsmr_parser.clients.telegram_buffer import EncryptedTelegramBuffer
from dsmr_parser.exceptions import DecryptionError, InvalidChecksumError, ParseError
from dsmr_parser.parsers import TelegramParser

from meterproof.meter.measurement import Measurement
from meterproof.schemas.reading import I64_MAX, I64_MIN
from meterproof.schemas.timestamps import dt_to_ms

#: Longer than any real telegram (about 1 KB; 3 KB with M-Bus devices and messages):
#: a start without an end within this many bytes is a telegram cut short.
MAX_TELEGRAM_BYTES: Final = 16_384
_TRAILER: Final = re.compile(rb"!([0-9A-F]{4})?\r\n\Z")
#: '!', four CRC digits, CRLF: the line end of a telegram's last line is this far away.
_MAX_TRAILER: Final = 6


class Version(StrEnum):
    """Which telegram specification (dsmr_parser's) applies; `auto` reads it per telegram."""

    AUTO = "auto"
    V2_2 = "2.2"
    V3 = "3"
    V4 = "4"
    V5 = "5"
    BELGIUM = "5B"  # Fluvius e-MUCS
    LUXEMBOURG = "5L"  # Smarty, in clear

    @property
    def has_crc(self) -> bool:
        return self not in (Version.V2_2, Version.V3)


_SPECS: Final[dict[Version, dict[str, Any]]] = {
    Version.V2_2: specs.V2_2,
    Version.V3: specs.V3,
    Version.V4: specs.V4,
    Version.V5: specs.V5,
    Version.BELGIUM: specs.BELGIUM_FLUVIUS,
    Version.LUXEMBOURG: specs.LUXEMBOURG_SMARTY,
}


class Outcome(StrEnum):
    """What became of a telegram: the label of `meterproof_p1_telegrams_total`."""

    ACCEPTED = "accepted"
    CRC_MISMATCH = "crc_mismatch"
    #: a DSMR 4/5 telegram without its CRC: never published
    CRC_MISSING = "crc_missing"
    #: a start ('/') without its end: the next telegram began, the stream ended, or too long
    TRUNCATED = "truncated"
    UNPARSABLE = "unparsable"
    MISSING_REGISTER = "missing_register"
    DECRYPT_FAILED = "decrypt_failed"
    # The reader's own, after a telegram decoded fine (see `reader.Gate`):
    #: sooner after the last published reading than --interval: not published, by design
    THINNED = "thinned"
    #: more than `MAX_FUTURE_MS` (schemas) ahead of the reader's clock: the ingest side's code
    TIMESTAMP_SKEW = "timestamp_skew"
    TIME_BACKWARDS = "time_backwards"
    REGISTER_DECREASED = "register_decreased"


@dataclass(frozen=True, slots=True)
class P1Reading:
    version: Version
    import_wh: int
    export_wh: int
    #: unix ms UTC of 0-0:1.0.0; None when the telegram carries no time
    ts: int | None
    power_w: int | None
    #: per phase, L1 first; empty when the telegram has none
    voltages_mv: tuple[int, ...] = ()
    currents_ma: tuple[int, ...] = ()

    @property
    def voltage_mv(self) -> int | None:
        return self.voltages_mv[0] if self.voltages_mv else None

    @property
    def current_ma(self) -> int | None:
        return self.currents_ma[0] if self.currents_ma else None

    def measurement(self, clock_ms: int) -> Measurement:
        """The signed fields; `clock_ms` stands in for a missing telegram time."""
        return Measurement(
            ts=self.ts if self.ts is not None else clock_ms,
            import_wh=self.import_wh,
            export_wh=self.export_wh,
            power_w=self.power_w,
            voltage_mv=self.voltage_mv,
            current_ma=self.current_ma,
        )

    def to_json(self) -> dict[str, object]:
        return {
            "version": self.version.value,
            "ts": self.ts,
            "import_wh": self.import_wh,
            "export_wh": self.export_wh,
            "power_w": self.power_w,
            "voltage_mv": self.voltage_mv,
            "current_ma": self.current_ma,
            "phases": max(len(self.voltages_mv), len(self.currents_ma)),
            "voltages_mv": list(self.voltages_mv),
            "currents_ma": list(self.currents_ma),
        }


@dataclass(frozen=True, slots=True)
class Decoded:
    """One telegram's fate; `sha256` is of its raw bytes as received (the audit trail)."""

    outcome: Outcome
    sha256: str
    reading: P1Reading | None = None
    detail: str = ""


def sha256_hex(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True, slots=True)
class Frame:
    raw: bytes
    complete: bool


@dataclass(slots=True)
class PlainFramer:
    """Splits a byte stream into '/' .. '!CRC CRLF' telegrams; counts what it skips.

    Noise outside telegrams adds to `garbage_bytes`; a telegram whose end never came
    (the next '/' arrived first, it outgrew `MAX_TELEGRAM_BYTES`, its last line is not
    '!' + CRC + CRLF, or the stream ended) comes out with `complete=False`.
    """

    garbage_bytes: int = 0
    _buffer: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames: list[Frame] = []
        while (found := self._next()) is not None:
            frames.append(found)
        return frames

    def finish(self) -> list[Frame]:
        """End of stream: a telegram still open is truncated."""
        frames = self.feed(b"")
        if self._buffer:
            frames.append(self._cut(len(self._buffer)))
        return frames

    def _next(self) -> Frame | None:
        buffer = self._buffer
        start = buffer.find(b"/")
        if start < 0:
            self.garbage_bytes += len(buffer)
            buffer.clear()
            return None
        self.garbage_bytes += start
        del buffer[:start]
        bang = buffer.find(b"!", 1)
        end = -1 if bang < 0 else buffer.find(b"\n", bang)
        restart = buffer.find(b"/", 1)
        if restart > 0 and (end < 0 or restart < end):
            return self._cut(restart)  # the next telegram began before this one ended
        if bang < 0:
            return self._cut(len(buffer)) if len(buffer) > MAX_TELEGRAM_BYTES else None
        if end < 0:
            return self._cut(len(buffer)) if len(buffer) - bang > _MAX_TRAILER else None
        if end - bang > _MAX_TRAILER:
            return self._cut(end + 1)
        return self._cut(end + 1, complete=True)

    def _cut(self, size: int, *, complete: bool = False) -> Frame:
        raw = bytes(self._buffer[:size])
        del self._buffer[:size]
        return Frame(raw, complete)


def detect(text: str) -> Version:
    """The specification a telegram follows, from the lines each one has."""
    if "\n0-0:96.1.4(" in text:
        return Version.BELGIUM
    if text.startswith("/Lux") or "\n0-0:42.0.0(" in text:
        return Version.LUXEMBOURG
    found = re.search(r"\n\d-\d:0\.2\.8\((\d+)\)", text)
    if found is None:
        return Version.V2_2
    return Version.V5 if int(found.group(1)) >= 50 else Version.V4


class _RefusedError(Exception):
    def __init__(self, outcome: Outcome, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail


@cache
def _parser(version: Version) -> TelegramParser:
    """A parser per specification: building one compiles every OBIS pattern."""
    return TelegramParser(_SPECS[version], apply_checksum_validation=False)


@cache
def _cipher_parser() -> TelegramParser:
    return TelegramParser(specs.MSN)


def decode_plain(raw: bytes, version: Version = Version.AUTO) -> Decoded:
    """One complete clear-text telegram ('/' .. '!CRC CRLF')."""
    digest = sha256_hex(raw)
    try:
        return Decoded(Outcome.ACCEPTED, digest, _decode_plain(raw, version))
    except _RefusedError as refused:
        return Decoded(refused.outcome, digest, detail=refused.detail)


def _decode_plain(raw: bytes, version: Version) -> P1Reading:
    # latin-1 maps each byte to one character, so the CRC runs over the bytes received.
    text = raw.decode("latin-1")
    trailer = _TRAILER.search(raw)
    if trailer is None:
        raise _RefusedError(Outcome.CRC_MISMATCH, "the line after '!' is not a CRC16")
    spec = detect(text) if version is Version.AUTO else version
    if trailer.group(1) is not None:
        try:
            TelegramParser.validate_checksum(text)
        except InvalidChecksumError:
            raise _RefusedError(Outcome.CRC_MISMATCH, "CRC16 does not match") from None
    elif spec.has_crc:
        raise _RefusedError(Outcome.CRC_MISSING, f"DSMR {spec.value} telegram without a CRC16")
    try:
        telegram = _parser(spec).parse(text, throw_ex=True)
    except (ParseError, ArithmeticError, ValueError) as exc:
        raise _RefusedError(Outcome.UNPARSABLE, str(exc).splitlines()[0][:200]) from None
    return to_reading(telegram, spec)


def decode_cipher(frame: bytes, key: bytes) -> Decoded:
    """One Smarty general-global-cipher frame: dsmr_parser authenticates and decrypts it
    (AES-128-GCM, the fixed Luxmetering authentication key), checks the CRC16 of the
    telegram inside and parses it."""
    digest = sha256_hex(frame)
    try:
        telegram = _cipher_parser().parse(frame.hex(), encryption_key=key.hex(), throw_ex=True)
    except DecryptionError as exc:
        return Decoded(Outcome.DECRYPT_FAILED, digest, detail=str(exc)[:200])
    except InvalidChecksumError:
        return Decoded(Outcome.CRC_MISMATCH, digest, detail="CRC16 does not match")
    except ParseError as exc:
        return Decoded(Outcome.UNPARSABLE, digest, detail=str(exc)[:200])
    except (ArithmeticError, ValueError, IndexError, KeyError) as exc:
        # dlms_cosem's APDU decoding of a malformed frame
        return Decoded(Outcome.DECRYPT_FAILED, digest, detail=f"not a cipher frame: {exc}"[:200])
    try:
        return Decoded(Outcome.ACCEPTED, digest, to_reading(telegram, Version.LUXEMBOURG))
    except _RefusedError as refused:
        return Decoded(refused.outcome, digest, detail=refused.detail)


def _scaled(telegram: object, name: str, unit: str, factor: int) -> int | None:
    """The register `name` in `unit` times `factor`, exactly; None if absent."""
    obj = getattr(telegram, name, None)
    if obj is None:
        return None
    value, got = obj.value, obj.unit
    if not isinstance(value, Decimal) or got != unit:
        detail = f"{name} is {value!r} {got!r}, not a number in {unit}"
        raise _RefusedError(Outcome.UNPARSABLE, detail)
    scaled = value * factor
    if scaled != scaled.to_integral_value():
        raise _RefusedError(Outcome.UNPARSABLE, f"{name} {value} {unit} is finer than 1/{factor}")
    if abs(scaled) > I64_MAX:
        # More digits than a signed field holds: signing it would fail and stop the
        # reader (two energy tariffs of this size still add up within a u64).
        raise _RefusedError(Outcome.UNPARSABLE, f"{name} is beyond a signed 64-bit integer")
    return int(scaled)


def _energy(telegram: object, tariffs: tuple[str, str], total: str, obis: str) -> int:
    parts = [_scaled(telegram, name, "kWh", 1000) for name in tariffs]
    if None in parts:
        parts = [_scaled(telegram, total, "kWh", 1000)]
    registers = [part for part in parts if part is not None]
    if not registers:
        raise _RefusedError(Outcome.MISSING_REGISTER, f"no {obis} register")
    if min(registers) < 0:  # each one, not only the sum: a cumulative total is never below 0
        raise _RefusedError(Outcome.UNPARSABLE, f"a register of {obis} is negative")
    return sum(registers)


def _phases(telegram: object, kind: str, unit: str) -> tuple[int, ...]:
    values = (_scaled(telegram, f"INSTANTANEOUS_{kind}_L{n}", unit, 1000) for n in (1, 2, 3))
    return tuple(value for value in values if value is not None)


def to_reading(telegram: object, version: Version) -> P1Reading:
    """Map a parsed dsmr_parser telegram to the registers we sign."""
    import_wh = _energy(
        telegram,
        ("ELECTRICITY_USED_TARIFF_1", "ELECTRICITY_USED_TARIFF_2"),
        "ELECTRICITY_IMPORTED_TOTAL",
        "1.8.1 + 1.8.2 (or 1.8.0)",
    )
    export_wh = _energy(
        telegram,
        ("ELECTRICITY_DELIVERED_TARIFF_1", "ELECTRICITY_DELIVERED_TARIFF_2"),
        "ELECTRICITY_EXPORTED_TOTAL",
        "2.8.1 + 2.8.2 (or 2.8.0)",
    )
    drawn = _scaled(telegram, "CURRENT_ELECTRICITY_USAGE", "kW", 1000)
    fed = _scaled(telegram, "CURRENT_ELECTRICITY_DELIVERY", "kW", 1000)
    power_w = None if drawn is None else drawn - (fed or 0)
    if power_w is not None and not I64_MIN <= power_w <= I64_MAX:
        raise _RefusedError(Outcome.UNPARSABLE, "1.7.0 - 2.7.0 is beyond a signed 64-bit W")
    return P1Reading(
        version=version,
        import_wh=import_wh,
        export_wh=export_wh,
        ts=_telegram_time(telegram),
        power_w=power_w,
        voltages_mv=_phases(telegram, "VOLTAGE", "V"),
        currents_ma=_phases(telegram, "CURRENT", "A"),
    )


def _telegram_time(telegram: object) -> int | None:
    obj = getattr(telegram, "P1_MESSAGE_TIMESTAMP", None)
    if obj is None:
        return None
    if obj.value is None:  # dsmr_parser's answer to a malformed time or S/W flag
        raise _RefusedError(Outcome.UNPARSABLE, "0-0:1.0.0 is not YYMMDDhhmmss followed by S or W")
    return dt_to_ms(obj.value)


class TelegramDecoder:
    """Bytes in, one `Decoded` per telegram out: clear text, or Smarty cipher frames when
    given the meter's key (framed by dsmr_parser's `EncryptedTelegramBuffer`, which
    resyncs on the cipher tag itself: noise between cipher frames is not counted)."""

    def __init__(self, *, version: Version = Version.AUTO, key: bytes | None = None) -> None:
        if key is not None and len(key) != 16:
            raise ValueError(f"a Smarty key is 16 bytes (32 hex digits), not {len(key)}")
        if key is not None and version not in (Version.AUTO, Version.LUXEMBOURG):
            raise ValueError(f"a key decrypts Smarty (5L) telegrams, not DSMR {version.value}")
        self.version = version
        self._key = key
        self._plain = PlainFramer()
        self._cipher = EncryptedTelegramBuffer()

    @property
    def garbage_bytes(self) -> int:
        return self._plain.garbage_bytes

    def feed(self, data: bytes) -> list[Decoded]:
        if self._key is not None:
            self._cipher.append(data)
            key = self._key
            return [decode_cipher(bytes.fromhex(hexed), key) for hexed in self._cipher.get_all()]
        return [self._decode(frame) for frame in self._plain.feed(data)]

    def finish(self) -> list[Decoded]:
        """The stream ended (or the port is reopened): what was open is truncated."""
        if self._key is not None:
            self._cipher = EncryptedTelegramBuffer()
            return []
        return [self._decode(frame) for frame in self._plain.finish()]

    def _decode(self, frame: Frame) -> Decoded:
        if not frame.complete:
            detail = f"{len(frame.raw)} bytes from '/' without a complete end"
            return Decoded(Outcome.TRUNCATED, sha256_hex(frame.raw), detail=detail)
        return decode_plain(frame.raw, self.version)
