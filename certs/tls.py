"""The TLS client context of every meterproof connection to the broker, built once here.

Every client trusts the operator root only and presents its own certificate (which
carries the issuing CA too): the broker maps its CN to the MQTT client id. TLS 1.3 is
the floor for our own services; meters accept 1.2 because firmware stacks lag behind.
"""

from __future__ import annotations

import ssl
from pathlib import Path


def client_context(
    *,
    cert: Path,
    key: Path,
    ca_cert: Path | None = None,
    ca_pem: str | None = None,
    minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
) -> ssl.SSLContext:
    """Mutual TLS to the broker with the identity's `cert` (chain) and `key`. The root comes
    from `ca_cert` or, for a process that opens thousands of connections and should read
    it once, from `ca_pem`."""
    if (ca_cert is None) == (ca_pem is None):
        raise ValueError("give exactly one of ca_cert and ca_pem")
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH,
        cafile=None if ca_cert is None else str(ca_cert),
        cadata=ca_pem,
    )
    context.minimum_version = minimum
    context.load_cert_chain(str(cert), str(key))
    return context
