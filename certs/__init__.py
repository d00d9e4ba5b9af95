"""Operator PKI: root CA, broker and device certificates, revocation, signing keys.

The Python API other packages use; `certs.layout` says where every file lives.
"""

from meterproof.certs.authority import Validity
from meterproof.certs.bootstrap import InitResult, init_pki
from meterproof.certs.bulk import BulkRow, issue_bulk, read_bulk_csv, write_bulk_csv
from meterproof.certs.crl import RevokeResult, refresh_crl, revoke
from meterproof.certs.errors import (
    IdentityConflictError,
    MissingCaError,
    PkiError,
    UnknownIdentityError,
)
from meterproof.certs.identities import (
    SERVICE_NAMES,
    IdentityRecord,
    IssuedDevice,
    ingest_identity,
    issue_device,
    issue_ingest_workers,
    issue_integrator,
    issue_service,
    load_identity,
)
from meterproof.certs.layout import DeviceFiles, IdentityFiles, PkiLayout

__all__ = [
    "SERVICE_NAMES",
    "BulkRow",
    "DeviceFiles",
    "IdentityConflictError",
    "IdentityFiles",
    "IdentityRecord",
    "InitResult",
    "IssuedDevice",
    "MissingCaError",
    "PkiError",
    "PkiLayout",
    "RevokeResult",
    "UnknownIdentityError",
    "Validity",
    "ingest_identity",
    "init_pki",
    "issue_bulk",
    "issue_device",
    "issue_ingest_workers",
    "issue_integrator",
    "issue_service",
    "load_identity",
    "read_bulk_csv",
    "refresh_crl",
    "revoke",
    "write_bulk_csv",
]
