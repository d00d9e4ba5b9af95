"""Where P1 bytes come from: a serial port, a TCP stream (ser2net-style adapters) or a
recorded file. Each is an async iterator of byte chunks; a dropped port or connection
ends the iteration with `UnavailableError`, and the reader decides to reopen it.

The serial line settings are dsmr_parser's: 9600 baud 7E1 for DSMR 2.2 and 3, 115200
baud 8N1 for DSMR 4 and later (its `SERIAL_SETTINGS_V5`; the P1 companion standard
gives 8N1 from DSMR 4.0 on, though dsmr_parser's own `SERIAL_SETTINGS_V4` says 7E1).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import serialx
import structlog
from dsmr_parser.clients.settings import SERIAL_SETTINGS_V2_2, SERIAL_SETTINGS_V5

from meterproof.errors import InputError, UnavailableError
from meterproof.meter.p1.telegram import Version

log = structlog.get_logger("meter.p1")

READ_BYTES: Final = 4096
#: A meter sends a telegram every 1 s (DSMR 5) to 10 s (DSMR 2.2 to 4): this long
#: without a byte means the line is dead, whatever the socket or port says.
DEFAULT_IDLE_TIMEOUT_S: Final = 60.0


class Source(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def finite(self) -> bool:
        """True for a recording, read once; a port or a socket is reopened when it drops."""
        ...

    def chunks(self) -> AsyncIterator[bytes]: ...


def serial_settings(version: Version) -> dict[str, Any]:
    """serialx connect arguments for the version's line settings."""
    old = version in (Version.V2_2, Version.V3)
    settings = SERIAL_SETTINGS_V2_2 if old else SERIAL_SETTINGS_V5
    return {
        "baudrate": settings["baudrate"],
        "byte_size": settings["bytesize"],
        "parity": serialx.Parity(settings["parity"]),
        "stopbits": serialx.StopBits(settings["stopbits"]),
    }


async def _read(
    reader: asyncio.StreamReader, name: str, idle_timeout_s: float
) -> AsyncIterator[bytes]:
    while True:
        try:
            async with asyncio.timeout(idle_timeout_s):
                chunk = await reader.read(READ_BYTES)
        except TimeoutError:
            raise UnavailableError(name, f"no data for {idle_timeout_s:g} s") from None
        except OSError as exc:
            raise UnavailableError(name, str(exc)) from None
        if not chunk:
            raise UnavailableError(name, "closed")
        yield chunk


@dataclass(frozen=True, slots=True)
class SerialSource:
    device: str
    version: Version = Version.AUTO
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S

    @property
    def name(self) -> str:
        return f"serial {self.device}"

    @property
    def finite(self) -> bool:
        return False

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            reader, writer = await serialx.open_serial_connection(
                self.device, **serial_settings(self.version)
            )
        except (OSError, serialx.SerialException) as exc:
            raise UnavailableError(self.name, str(exc)) from None
        log.info("p1.source_open", source=self.name, **serial_settings(self.version))
        try:
            async for chunk in _read(reader, self.name, self.idle_timeout_s):
                yield chunk
        finally:
            writer.close()


@dataclass(frozen=True, slots=True)
class TcpSource:
    host: str
    port: int
    connect_timeout_s: float = 10.0
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S

    @property
    def name(self) -> str:
        return f"tcp {self.host}:{self.port}"

    @property
    def finite(self) -> bool:
        return False

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                reader, writer = await asyncio.open_connection(self.host, self.port)
        except (OSError, TimeoutError) as exc:
            raise UnavailableError(self.name, str(exc) or "connect timed out") from None
        log.info("p1.source_open", source=self.name)
        try:
            async for chunk in _read(reader, self.name, self.idle_timeout_s):
                yield chunk
        finally:
            writer.close()


@dataclass(frozen=True, slots=True)
class FileSource:
    path: Path

    @property
    def name(self) -> str:
        return f"file {self.path}"

    @property
    def finite(self) -> bool:
        return True

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            data = await asyncio.to_thread(self.path.read_bytes)
        except OSError as exc:
            raise InputError(f"{self.path}: {exc.strerror or exc}") from None
        yield data


def parse_host_port(value: str) -> tuple[str, int]:
    """'host:port' (or '[v6 address]:port') as a ser2net-style adapter listens."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"{value!r} is not HOST:PORT")
    return host, int(port)
