"""Serving the app: uvicorn over HTTPS, TLS 1.3 only, with the operator CA's server
certificate (the broker's), and client certificates of the same CA asked for but
optional: a meter proves itself with one, token holders need none.

uvicorn does not pass the peer certificate to the app, so the HTTP protocol here puts the
verified certificate's CN into the connection's ASGI state, where `api.auth` reads it; a
WebSocket upgrade hands the same state to the WebSocket protocol. A certificate the
operator revoked (`certs revoke`, the CA's revoked index) is marked instead, and its caller
is refused `certificate_revoked`: the index is read again whenever it changes, so a
revocation holds from the next connection on, as on the broker. The state also carries
the certificate's serial and the index, so an open WebSocket stream asks again on every
tick and closes once its certificate is revoked (`api.auth.still_valid`)."""

from __future__ import annotations

import ssl
from typing import Any

import structlog
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from meterproof.api.app import create_app
from meterproof.api.auth import PEER_CN, PEER_REVOKED, PEER_SERIAL, REVOKED_SERIALS
from meterproof.api.settings import ApiSettings
from meterproof.certs.crl import read_revoked
from meterproof.certs.layout import PkiLayout
from meterproof.errors import InputError
from meterproof.heap import keep_freed_memory
from meterproof.probes import serve_probes

log = structlog.get_logger("api.server")


class RevokedSerials:
    """The serials of the CA's revoked index, reread when the file changes."""

    def __init__(self, pki: PkiLayout) -> None:
        self._pki = pki
        self._stamp: tuple[int, int] | None = None
        self._serials: frozenset[str] = frozenset()

    def __contains__(self, serial: str) -> bool:
        try:
            stat = self._pki.revoked_index.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            return False
        if stamp != self._stamp:
            self._serials = frozenset(e.serial for e in read_revoked(self._pki))
            self._stamp = stamp
        return serial in self._serials


def _protocol(revoked: RevokedSerials) -> type[H11Protocol]:
    class PeerCertificateProtocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:  # noqa: ANN401 - asyncio's
            """Each connection copies the shared state; only this one's gets its peer."""
            state = dict(self.app_state)
            peer = transport.get_extra_info("peercert")
            cn = _common_name(peer) if peer else None
            if cn is not None:
                serial = str(peer.get("serialNumber", "")).lower().lstrip("0")
                if serial in revoked:
                    state[PEER_REVOKED] = cn
                    log.warning("revoked_certificate_presented", cn=cn, serial=serial)
                else:
                    state[PEER_CN] = cn
                    state[PEER_SERIAL] = serial
                    state[REVOKED_SERIALS] = revoked  # a stream asks again on every tick
            self.app_state = state
            super().connection_made(transport)

    return PeerCertificateProtocol


def _common_name(peer: dict[str, Any]) -> str | None:
    for rdn in peer.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def _ready(app: Any) -> bool:  # noqa: ANN401 - uvicorn types its app loosely
    """Ready once the lifespan has started the submission pipeline and it is running."""
    services = getattr(app.state, "services", None)
    return services is not None and bool(services.worker.ready())


def config(settings: ApiSettings) -> uvicorn.Config:
    pki = PkiLayout(settings.pki_root)
    for path in (pki.server_cert, pki.server_key, pki.ca_cert):
        if not path.is_file():
            raise InputError(f"missing {path}: run `meterproof certs init` (make certs) first")
    conf = uvicorn.Config(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        ssl_certfile=str(pki.server_cert),
        ssl_keyfile=str(pki.server_key),
        ssl_ca_certs=str(pki.ca_cert),
        ssl_cert_reqs=ssl.CERT_OPTIONAL,
        http=_protocol(RevokedSerials(pki)),
        ws="websockets-sansio",  # uvicorn's "auto" choice; "websockets" is the deprecated legacy
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
    )
    conf.load()
    assert conf.ssl is not None
    conf.ssl.minimum_version = ssl.TLSVersion.TLSv1_3
    return conf


async def serve(settings: ApiSettings) -> None:
    """Until SIGTERM/SIGINT (uvicorn's handlers): in-flight requests finish first."""
    if settings.api_heap_keep_mib:
        kept = keep_freed_memory(settings.api_heap_keep_mib << 20)
        log.info("heap_kept" if kept else "heap_default", keep_mib=settings.api_heap_keep_mib)
    conf = config(settings)
    app = conf.app
    probes = serve_probes("127.0.0.1", settings.api_metrics_port, ready=lambda: _ready(app))
    try:
        await uvicorn.Server(conf).serve()
    finally:
        if probes is not None:
            probes.close()
