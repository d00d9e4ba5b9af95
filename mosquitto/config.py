"""Render the broker's files for one environment from the templates beside this module.

Everything the broker reads or writes lives in `<run_dir>/mosquitto/` (mode 0700), so the
stack runner, the test fixtures and `mosquitto.admin` find it from the run directory alone:
`broker_files(run_dir)` names the files, `render(...)` writes them, and the broker starts
with `mosquitto -c <conf>` (`BrokerFiles.argv`).

The dynamic-security file and the admin password are created once and then left alone:
after the broker starts, the plugin owns its file and rewrites it on every change, so a
second `render()` (for example after issuing an integrator, followed by SIGHUP) rewrites
the config and the ACL only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pwd
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import Final

from meterproof.certs.identities import API_IDENTITY, INGEST_IDENTITY_RE, SERVICE_NAMES
from meterproof.certs.keys import PRIVATE_FILE_MODE, locked, replace_file
from meterproof.certs.layout import IDENTITY_RE, PkiLayout
from meterproof.schemas import topics

#: Where Debian's `mosquitto` package puts the plugin (per architecture), then a source build.
DYNSEC_PLUGIN_GLOBS: Final = (
    "/usr/lib/*/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)

#: The dynamic-security admin account. The colon keeps it outside the identity alphabet, so
#: no certificate our CA issues can carry it as CN: the plugin matches ACLs by username, and a
#: client certificate named like the admin account would inherit its $CONTROL rights (the
#: PKI does issue a service certificate called "admin").
ADMIN_USERNAME: Final = "dynsec:admin"

#: The bridge's identity; ingest workers are `ingest-<instance>` (INGEST_IDENTITY_RE), one
#: certificate each. Any other service (`admin`, the retired shared `ingest`) gets no rights.
BRIDGE: Final = "bridge"

_ADMIN_ROLE: Final = "meterproof-admin"
_CONTROL_TOPIC: Final = "$CONTROL/dynamic-security/#"
# The plugin's own format: PBKDF2-HMAC-SHA512 with a 12-byte salt, as `mosquitto_ctrl
# dynsec init` writes it. The password is 32 random bytes, so iterations add nothing against
# guessing; a high count would only cost the single-threaded broker CPU at every admin login.
_PBKDF2_ITERATIONS: Final = 101
_SALT_BYTES: Final = 12


@dataclass(frozen=True, slots=True)
class BrokerFiles:
    """Paths of one broker instance; all inside `directory` (= `<run_dir>/mosquitto`)."""

    directory: Path
    conf: Path
    acl: Path
    dynsec: Path
    admin_password: Path
    persistence_dir: Path
    log: Path
    pid: Path

    @property
    def argv(self) -> list[str]:
        return ["mosquitto", "-c", str(self.conf)]


def broker_files(run_dir: Path, index: int = 0) -> BrokerFiles:
    """Broker `index` of a run dir: the first in `mosquitto/`, the others (`stack up --ha`)
    in `mosquitto-<index>/`, each with its own persistence, log and pid file."""
    if index < 0:
        raise ValueError(f"a broker index is 0 or more, not {index}")
    directory = run_dir.absolute() / ("mosquitto" if index == 0 else f"mosquitto-{index}")
    return BrokerFiles(
        directory=directory,
        conf=directory / "mosquitto.conf",
        acl=directory / "meterproof.acl",
        dynsec=directory / "dynamic-security.json",
        admin_password=directory / "admin.password",
        persistence_dir=directory / "data",
        log=directory / "mosquitto.log",
        pid=directory / "mosquitto.pid",
    )


def render(
    *,
    run_dir: Path,
    pki: PkiLayout,
    tls_port: int,
    admin_port: int | None,
    bind: str = "127.0.0.1",
    cafile: Path | None = None,
    integrators: Sequence[str] | None = None,
    index: int = 0,
) -> BrokerFiles:
    """Write the config, the ACL and (first time only) the admin account; return the paths.

    Broker `index` > 0 is one more broker of the same run dir: same CA, CRL and ACL, and
    the first broker's dynamic-security file and admin password, so one admin login and
    one revocation command serve every broker.

    `cafile` defaults to the PKI's root and may hold a chain. `integrators` defaults to the
    folders under `<pki.root>/integrators/`. Without `admin_port` there is no admin
    listener, and `mosquitto.admin.enforce_revocation` cannot cut open connections.
    """
    for port in (tls_port, admin_port):
        if port is not None and not 1 <= port <= 65535:
            raise ValueError(f"port must be in 1..65535, not {port}")
    if admin_port == tls_port:
        raise ValueError("the admin listener needs a port of its own")
    tls_files = {
        "cafile": cafile or pki.ca_cert,
        "certfile": pki.server_cert,
        "keyfile": pki.server_key,
        "crlfile": pki.crl,
    }
    for name, path in tls_files.items():
        if not path.is_file():
            raise FileNotFoundError(f"{name} {path} does not exist: create the PKI first")
    if integrators is None:
        integrators = _folder_names(pki.root / "integrators")
    services = sorted({*SERVICE_NAMES, *_folder_names(pki.root / "services")})

    files = broker_files(run_dir, index)
    files.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    files.directory.chmod(0o700)
    files.persistence_dir.mkdir(mode=0o700, exist_ok=True)

    admin_listener = (
        ""
        if admin_port is None
        else _template("admin-listener.conf.tmpl").substitute(admin_port=admin_port)
    )
    conf = _template("mosquitto.conf.tmpl").substitute(
        user=pwd.getpwuid(os.geteuid()).pw_name,
        pid_file=files.pid,
        acl_file=files.acl,
        dynsec_plugin=dynsec_plugin(),
        dynsec_file=files.dynsec,
        persistence_dir=files.persistence_dir,
        log_file=files.log,
        tls_port=tls_port,
        bind=bind,
        admin_listener=admin_listener,
        **{name: path.absolute() for name, path in tls_files.items()},
    )
    acl = _template("meterproof.acl.tmpl").substitute(
        identity_blocks="\n\n".join(_acl_blocks(services, integrators))
    )
    _write_private(files.conf, conf)
    _write_private(files.acl, acl)
    _ensure_admin_account(files, broker_files(run_dir))
    return files


def _ensure_admin_account(files: BrokerFiles, first: BrokerFiles) -> None:
    """Write the dynamic-security file and the admin password unless both exist: broker 0
    makes a new password, a later broker copies broker 0's. Under one lock per run dir:
    two first renders at once (`stack up` while an operator issues an identity) would each
    make a password, and the plugin file of one could end beside the password of the
    other, which locks the admin (and so every revocation) out."""
    first.directory.mkdir(mode=0o700, exist_ok=True)
    with locked(first.directory / ".admin.lock"):
        if files.dynsec.is_file() and files.admin_password.is_file():
            return
        if files != first and first.dynsec.is_file() and first.admin_password.is_file():
            dynsec = first.dynsec.read_text(encoding="utf-8")
            password = admin_password(first)
        else:
            password = secrets.token_urlsafe(32)
            dynsec = json.dumps(dynsec_config(password), indent=2) + "\n"
        _write_private(files.dynsec, dynsec)
        _write_private(files.admin_password, password + "\n")


def dynsec_plugin() -> Path:
    for pattern in DYNSEC_PLUGIN_GLOBS:
        found = sorted(Path("/").glob(pattern.removeprefix("/")))
        if found:
            return found[0]
    raise FileNotFoundError("mosquitto_dynamic_security.so not found: install mosquitto 2.0")


def admin_password(files: BrokerFiles) -> str:
    return files.admin_password.read_text(encoding="utf-8").strip()


def dynsec_config(password: str) -> dict[str, object]:
    """The plugin's file: the admin account only, every default access denied.

    Measured on 2.0.11: the plugin is asked before acl_file, judges only usernames it
    knows, and applies `defaultACLAccess` to a known client that no role matches. With the
    init tool's defaults (receive allowed) a client it knows would receive every topic it
    subscribes to, whatever acl_file says; with all four false it defers to acl_file.
    """
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _PBKDF2_ITERATIONS)
    control_acls = [
        {"acltype": acltype, "topic": _CONTROL_TOPIC, "allow": True}
        for acltype in (
            "publishClientSend",
            "publishClientReceive",
            "subscribePattern",
            "unsubscribePattern",
        )
    ]
    return {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": False,
        },
        "clients": [
            {
                "username": ADMIN_USERNAME,
                "textName": "meterproof broker administration (revocation)",
                "password": base64.b64encode(digest).decode(),
                "salt": base64.b64encode(salt).decode(),
                "iterations": _PBKDF2_ITERATIONS,
                "roles": [{"rolename": _ADMIN_ROLE}],
            }
        ],
        "groups": [],
        "roles": [{"rolename": _ADMIN_ROLE, "acls": control_acls}],
    }


def _acl_blocks(services: Iterable[str], integrators: Iterable[str]) -> Iterable[str]:
    announced = [
        f"topic write {topics.VERIFIED_ALL}",
        f"topic write {topics.INTEGRATORS_VERIFIED_ALL}",
    ]
    ingest = [
        f"topic read {topics.READINGS_FILTER}",
        f"topic write {topics.RECEIPTS_FILTER}",
        *announced,
    ]
    yield (
        "# The dynamic-security admin: its plugin role grants $CONTROL, this file nothing.\n"
        f"user {ADMIN_USERNAME}\n"
        "topic deny #"
    )
    for name in services:
        if INGEST_IDENTITY_RE.fullmatch(name):
            role, grants = "ingest worker: readings in, receipts and verified out", ingest
        elif name == BRIDGE:
            role, grants = (
                "ledger bridge: verified readings in, ledger epochs out",
                [
                    f"topic read {topics.VERIFIED_ALL}",
                    f"topic write {topics.LEDGER_ALL}",
                ],
            )
        elif name == API_IDENTITY:
            # Receipts go back in the HTTP answer, and it reads nothing: a leaked API
            # certificate can forge announcements (as a worker's can) but read no reading.
            role, grants = "HTTP API: verified copies and integrators' feeds out", announced
        else:
            role, grants = "no topic rights", []
        yield "\n".join(
            [
                f"# Service {name!r}: {role}",
                f"user {_checked(name)}",
                f"topic deny {topics.of_meter(name)}",
                *grants,
            ]
        )
    for name in integrators:
        yield "\n".join(
            [
                f"# Integrator {name!r}: its consented feed (workers publish only what the"
                " owners' consents cover) and ledger epochs",
                f"user {_checked(name)}",
                f"topic deny {topics.of_meter(name)}",
                f"topic read {topics.integrator_feed(name)}",
                f"topic read {topics.LEDGER_ALL}",
            ]
        )


def _checked(name: str) -> str:
    """A name outside the alphabet could smuggle ACL syntax (spaces, +, #) into the file."""
    if not IDENTITY_RE.fullmatch(name) or name in {".", ".."}:
        raise ValueError(f"invalid identity {name!r}: 1-64 characters of [A-Za-z0-9._-]")
    return name


def _folder_names(directory: Path) -> list[str]:
    """Every identity folder, dotted names too: the PKI issues `.acme` (the alphabet allows
    a leading dot), and an identity left out of this file gets the meter patterns instead
    of its own block."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.is_dir())


def _template(name: str) -> Template:
    return Template(resources.files(__package__).joinpath(name).read_text(encoding="utf-8"))


def _write_private(path: Path, text: str) -> None:
    """Atomic replace, 0600, through a temporary file of its own: a SIGHUP never reads half
    a file, nobody else reads secrets, and two renders at once (`stack up` while an
    operator issues an identity) never write into each other's file."""
    replace_file(path, text.encode("utf-8"), mode=PRIVATE_FILE_MODE)
