"""A meter's credentials as the PKI wrote them, and the TLS context they make."""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from pathlib import Path

from meterproof.certs.errors import SharedKeyError
from meterproof.certs.keys import refuse_shared
from meterproof.certs.layout import DeviceFiles, PkiLayout
from meterproof.certs.tls import client_context
from meterproof.errors import InputError
from meterproof.schemas.reading import Alg
from meterproof.schemas.signatures import PrivateKey, load_private_key


class IdentityError(InputError):
    """A device directory is missing a file or names another meter."""


@dataclass(frozen=True, slots=True)
class MeterIdentity:
    meter_id: str
    alg: Alg
    files: DeviceFiles
    key: PrivateKey

    @classmethod
    def load(cls, files: DeviceFiles) -> MeterIdentity:
        try:
            meta = json.loads(files.meta.read_bytes())
            key_pem = files.signing_key.read_bytes()
            modes = [(p, p.stat().st_mode) for p in (files.signing_key, files.key)]
        except (OSError, ValueError) as exc:
            raise IdentityError(f"{files.directory}: {exc}") from None
        for path, mode in modes:  # whoever can read one can sign, or log in, as this meter
            try:
                refuse_shared(path, mode)
            except SharedKeyError as exc:
                raise IdentityError(f"{path}: {exc}") from None
        meter_id = files.directory.name
        if not isinstance(meta, dict) or meta.get("meter_id") != meter_id:
            raise IdentityError(f"{files.meta}: not the identity of meter {meter_id}")
        try:
            alg = Alg(meta["alg"])
        except (KeyError, ValueError):
            choices = ", ".join(Alg)
            raise IdentityError(f"{files.meta}: alg {meta.get('alg')!r} is not {choices}") from None
        try:
            key = load_private_key(alg, key_pem)
        except ValueError as exc:  # not a PEM key, or not one for `alg`
            raise IdentityError(f"{files.signing_key}: {exc}") from None
        return cls(meter_id, alg, files, key)


def discover(layout: PkiLayout, *, limit: int | None = None) -> list[MeterIdentity]:
    """The meter identities of the PKI folder by meter id, the first `limit` of them."""
    if not layout.devices_dir.is_dir():
        return []
    ids = sorted(
        path.name for path in layout.devices_dir.iterdir() if (path / "identity.json").is_file()
    )
    return [MeterIdentity.load(layout.device(meter_id)) for meter_id in ids[:limit]]


class _ClosingSSLSocket(ssl.SSLSocket):
    """paho leaves the socket of a failed handshake open (a ResourceWarning, an fd held
    until GC); a broker that restarts under a fleet makes that common, so close it."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def client_tls(*, ca_cert: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """A meter's mutual-TLS context: TLS 1.2 and up, as firmware stacks offer, with
    sockets that close after a failed handshake."""
    context = client_context(cert=cert, key=key, ca_cert=ca_cert, minimum=ssl.TLSVersion.TLSv1_2)
    context.sslsocket_class = _ClosingSSLSocket
    return context
