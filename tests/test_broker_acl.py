"""The rendered broker config against a real Mosquitto: who may connect, publish and read.

One broker per module, on free ports, with a throwaway two-level PKI shaped like the
operator's (root in `cafile`, an issuing CA that signs the leaves and the CRL, leaf files
carrying the chain). Every test uses identities and topics of its own.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import json
import os
import queue
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from waiting import wait_until

from meterproof.certs import crl
from meterproof.certs.bootstrap import init_pki
from meterproof.certs.cli import certs as certs_cli
from meterproof.certs.identities import issue_device
from meterproof.certs.layout import IdentityFiles, PkiLayout
from meterproof.config import StackEnv, new_share_group
from meterproof.mosquitto import admin as broker_admin
from meterproof.mosquitto import config as broker_config
from meterproof.mosquitto.admin import (
    RELOADING,
    RUNNING,
    BrokerNotRunningError,
    enforce_revocation,
    logged_after,
)
from meterproof.mosquitto.config import (
    ADMIN_USERNAME,
    BrokerFiles,
    admin_password,
    broker_files,
    render,
)
from meterproof.stack.process import free_port

pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None, reason="needs mosquitto")

WAIT = 5.0  # seconds; every wait in this module is bounded by it
NOT_AUTHORIZED = 135
INTEGRATOR = "integ-a"
DOTTED_INTEGRATOR = ".integ-b"  # the identity alphabet allows a leading dot
INGEST = "ingest-0"  # an ingest worker identity; "ingest" alone is the retired shared one


# ---------------------------------------------------------------------------------------
# A throwaway PKI with the operator PKI's shape
# ---------------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _ca(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None = None,
    *,
    by: ec.EllipticCurvePrivateKey | None = None,
) -> x509.Certificate:
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.subject if issuer else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(by or key, hashes.SHA256())
    )


@dataclass
class ThrowawayCa:
    """Root → issuing CA → leaves; `revoke` rewrites the CRL signed by the issuing CA."""

    layout: PkiLayout
    root_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    issuing_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    revoked: list[x509.Certificate] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = _ca("test root", self.root_key)
        self.issuing = _ca("test issuing", self.issuing_key, self.root, by=self.root_key)
        self.layout.ca_dir.mkdir(parents=True)
        self.layout.ca_cert.write_bytes(_pem(self.root))
        self.write_crl()
        server = self.issue(self.layout.server_cert.parent, "localhost", server=True)
        server.cert.rename(self.layout.server_cert)
        server.key.rename(self.layout.server_key)

    def issue(
        self,
        directory: Path,
        cn: str,
        *,
        server: bool = False,
        not_after: datetime | None = None,
    ) -> IdentityFiles:
        now = datetime.now(UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.issuing.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=2))
            .not_valid_after(not_after or now + timedelta(days=30))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self.issuing_key, hashes.SHA256())
        files = IdentityFiles(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files.cert.write_bytes(_pem(cert) + _pem(self.issuing))
        files.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return files

    def revoke(self, files: IdentityFiles) -> None:
        self.revoked.append(x509.load_pem_x509_certificate(files.cert.read_bytes()))
        self.write_crl()

    def write_crl(self) -> None:
        now = datetime.now(UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.issuing.subject)
            .last_update(now - timedelta(minutes=5))
            .next_update(now + timedelta(days=7))
        )
        for cert in self.revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(cert.serial_number)
                .revocation_date(now - timedelta(minutes=1))
                .build()
            )
        crl = builder.sign(self.issuing_key, hashes.SHA256())
        tmp = self.layout.crl.with_suffix(".tmp")
        tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        tmp.replace(self.layout.crl)


# ---------------------------------------------------------------------------------------
# MQTT peers with bounded waits
# ---------------------------------------------------------------------------------------


class Peer:
    """A paho MQTT 5 client (TLS when given a CA) recording CONNACK, PUBACKs, messages."""

    def __init__(
        self, *, port: int, ca: Path | None, identity: IdentityFiles | None, client_id: str
    ) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
        )
        if ca is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.load_verify_locations(ca)
            if identity is not None:
                context.load_cert_chain(identity.cert, identity.key)
            self.client.tls_set_context(context)
        self.port = port
        self.connack: queue.Queue[ReasonCode | None] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.disconnected: queue.Queue[ReasonCode] = queue.Queue()
        self.subacks: queue.Queue[list[ReasonCode]] = queue.Queue()
        self._pubacks: dict[int, ReasonCode] = {}
        self._puback_seen = threading.Condition()
        self.connack_properties: Properties | None = None
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = lambda _c, _u: self.connack.put(None)
        self.client.on_disconnect = lambda _c, _u, _f, rc, _p: self._closed(rc)
        self.client.on_message = lambda _c, _u, message: self.messages.put(message)
        self.client.on_subscribe = lambda _c, _u, _m, rcs, _p: self.subacks.put(rcs)
        self.client.on_publish = self._on_publish

    def _on_connect(self, _c, _u, _f, rc: ReasonCode, properties: Properties | None) -> None:
        self.connack_properties = properties
        self.connack.put(rc)

    def _closed(self, rc: ReasonCode) -> None:
        self.connack.put(None)
        self.disconnected.put(rc)

    def _on_publish(self, _c, _u, mid: int, rc: ReasonCode, _p) -> None:
        with self._puback_seen:
            self._pubacks[mid] = rc
            self._puback_seen.notify_all()

    def connect(
        self, *, clean_start: bool = True, session_expiry: int = 0, keepalive: int = 60
    ) -> bool:
        """True once CONNACK says success; False if TLS or the broker refused us."""
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = session_expiry
        try:
            self.client.connect(
                "127.0.0.1",
                self.port,
                keepalive=keepalive,
                clean_start=clean_start,
                properties=properties,
            )
        except (ssl.SSLError, OSError):
            return False
        self.client.loop_start()
        try:
            rc = self.connack.get(timeout=WAIT)
        except queue.Empty:
            return False
        return rc is not None and not rc.is_failure

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def subscribe(self, *topics: str) -> None:
        for topic in topics:
            self.client.subscribe(topic, qos=1)
            assert not self.subacks.get(timeout=WAIT)[0].is_failure

    def publish(self, topic: str, payload: bytes) -> int:
        """The PUBACK reason code (0 success, 16 no subscribers, 135 not authorised)."""
        mid = self.client.publish(topic, payload, qos=1).mid
        with self._puback_seen:
            assert self._puback_seen.wait_for(lambda: mid in self._pubacks, timeout=WAIT)
            return self._pubacks.pop(mid).value

    def next_message(self) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=WAIT)

    def assert_no_message(self, within: float = 0.3) -> None:
        try:
            message = self.messages.get(timeout=within)
        except queue.Empty:
            return
        pytest.fail(f"unexpected message on {message.topic}: {message.payload!r}")


@dataclass
class Broker:
    ca: ThrowawayCa
    files: BrokerFiles
    env: StackEnv
    peers: list[Peer] = field(default_factory=list)

    @property
    def pki(self) -> PkiLayout:
        return self.ca.layout

    def meter(self, prefix: str) -> tuple[str, IdentityFiles]:
        """A new meter id and its certificate: meters need no ACL lines of their own."""
        meter_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
        return meter_id, self.ca.issue(self.pki.device(meter_id).directory, meter_id)

    def peer(self, identity: IdentityFiles | None, *, client_id: str | None = None) -> Peer:
        peer = Peer(
            port=self.env.mqtt_port,
            ca=self.pki.ca_cert,
            identity=identity,
            client_id=client_id or f"t-{uuid.uuid4().hex[:12]}",
        )
        self.peers.append(peer)
        return peer

    def connected(self, identity: IdentityFiles, **kwargs: str) -> Peer:
        peer = self.peer(identity, **kwargs)
        assert peer.connect(), f"{identity.directory.name} could not connect"
        return peer


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    root = tmp_path_factory.mktemp("broker-acl")
    ca = ThrowawayCa(PkiLayout(root / "pki"))
    for service in (INGEST, "ingest-1", "bridge", "api", "admin", "ingest"):
        ca.issue(ca.layout.service(service).directory, service)
    for integrator in (INTEGRATOR, DOTTED_INTEGRATOR):
        ca.issue(ca.layout.integrator(integrator).directory, integrator)
    with _running_broker(ca.layout, root / "run") as (files, env):
        yield Broker(ca, files, env)


@contextmanager
def _running_broker(pki: PkiLayout, run_dir: Path) -> Iterator[tuple[BrokerFiles, StackEnv]]:
    """Mosquitto with the files `render` writes for `pki`, on free ports, until the block
    ends; the env names it as `stack.env` would."""
    tls_port, admin_port = free_port(), free_port()
    files = render(run_dir=run_dir, pki=pki, tls_port=tls_port, admin_port=admin_port)
    env = StackEnv(
        run_dir=run_dir, pki_root=pki.root, mqtt_port=tls_port, mqtt_admin_port=admin_port
    )
    with (files.directory / "stderr.log").open("wb") as stderr:
        process = subprocess.Popen(
            files.argv, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
        )

    def running() -> bool:
        """Both ports accept, and the signal handlers are in place (a SIGHUP before them
        ends the process)."""
        assert process.poll() is None, (files.directory / "stderr.log").read_text()
        return _accepts(tls_port) and _accepts(admin_port) and logged_after(files.log, 0, RUNNING)

    try:
        try:
            wait_until(running, what="the broker running on both ports", within_s=10)
        except AssertionError as exc:
            if files.log.exists():
                exc.add_note(files.log.read_text())
            raise
        yield files, env
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def mq(acl_broker: Broker) -> Iterator[Broker]:
    """The module's broker; closes the peers a test opened."""
    yield acl_broker
    for peer in acl_broker.peers:
        peer.close()
    acl_broker.peers.clear()


# ---------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------


def _directives(conf: Path) -> list[str]:
    return [line for line in conf.read_text().splitlines() if line and not line.startswith("#")]


def test_render_binds_every_listener_and_keeps_secrets_private(tmp_path: Path) -> None:
    ca = ThrowawayCa(PkiLayout(tmp_path / "pki"))
    files = render(run_dir=tmp_path / "run", pki=ca.layout, tls_port=18883, admin_port=18884)
    directives = _directives(files.conf)
    listeners = [line for line in directives if line.startswith("listener")]
    assert listeners == ["listener 18883 127.0.0.1", "listener 18884 127.0.0.1"]
    assert directives[0] == "user " + files.conf.owner()
    assert "allow_anonymous false" in directives
    assert not any("${" in line or "$$" in line for line in directives)
    tls_listener = directives.index("listener 18883 127.0.0.1")
    assert directives.index("use_username_as_clientid true") > tls_listener
    assert stat.S_IMODE(files.directory.stat().st_mode) == 0o700
    for path in (files.conf, files.acl, files.dynsec, files.admin_password):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path

    password, dynsec = admin_password(files), files.dynsec.read_bytes()
    again = render(run_dir=tmp_path / "run", pki=ca.layout, tls_port=18883, admin_port=None)
    assert (admin_password(again), again.dynsec.read_bytes()) == (password, dynsec)
    assert [line for line in _directives(again.conf) if line.startswith("listener")] == [
        "listener 18883 127.0.0.1"
    ]


def test_render_refuses_names_that_would_inject_acl_lines(tmp_path: Path) -> None:
    ca = ThrowawayCa(PkiLayout(tmp_path / "pki"))
    with pytest.raises(ValueError, match="invalid identity"):
        render(
            run_dir=tmp_path / "run",
            pki=ca.layout,
            tls_port=18883,
            admin_port=None,
            integrators=["acme\ntopic readwrite #"],
        )


def test_concurrent_renders_never_mix_their_files(tmp_path: Path) -> None:
    """`stack up` renders while an operator's `certs issue-integrator` renders too: each
    ACL the broker may read is one render's whole file, and neither render fails."""
    ca = ThrowawayCa(PkiLayout(tmp_path / "pki"))
    lists = ([], [f"integ-{i}" for i in range(2_000)])
    seen: set[str] = set()
    failures: list[Exception] = []

    def renders(integrators: list[str]) -> None:
        for _ in range(40):
            try:
                files = render(run_dir=tmp_path / "run", pki=ca.layout, tls_port=18883,
                               admin_port=None, integrators=integrators)  # fmt: skip
                seen.add(files.acl.read_text())
            except Exception as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

    threads = [threading.Thread(target=renders, args=(names,)) for names in lists]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert len(seen) == 2, "an ACL mixed from two renders"


def _renders_at_once(run_dir: Path, pki: PkiLayout) -> None:
    start = threading.Barrier(2)

    def first_render() -> None:
        start.wait()
        render(run_dir=run_dir, pki=pki, tls_port=18883, admin_port=18884)

    threads = [threading.Thread(target=first_render) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _admin_password_opens_dynsec(files: BrokerFiles) -> bool:
    """Whether the plugin file's admin hash is of `admin.password` (the plugin's PBKDF2)."""
    clients = json.loads(files.dynsec.read_text())["clients"]
    [admin] = [client for client in clients if client["username"] == ADMIN_USERNAME]
    digest = hashlib.pbkdf2_hmac(
        "sha512",
        admin_password(files).encode(),
        base64.b64decode(admin["salt"]),
        admin["iterations"],
    )
    return base64.b64encode(digest).decode() == admin["password"]


def test_concurrent_first_renders_agree_on_the_admin_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two first renders of a run dir at once (`stack up` while an operator issues an
    identity) each made a password, and the plugin file of one could end beside the
    other's password (2 to 16 in 100 tries), locking the admin, and so every revocation,
    out. Each render is held where it makes the account until the other gets there too
    (at most a second): one password may be made, whatever the timing."""
    ca = ThrowawayCa(PkiLayout(tmp_path / "pki"))
    both_there = threading.Barrier(2, timeout=1.0)
    made: list[str] = []
    make = broker_config.dynsec_config

    def held_dynsec_config(password: str) -> dict[str, object]:
        made.append(password)
        with contextlib.suppress(threading.BrokenBarrierError):
            both_there.wait()
        return make(password)

    monkeypatch.setattr(broker_config, "dynsec_config", held_dynsec_config)
    _renders_at_once(tmp_path / "run", ca.layout)
    files = broker_files(tmp_path / "run")
    assert made == [admin_password(files)]
    assert _admin_password_opens_dynsec(files)


def test_render_requires_the_pki(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cafile"):
        render(run_dir=tmp_path, pki=PkiLayout(tmp_path / "none"), tls_port=1, admin_port=None)


# ---------------------------------------------------------------------------------------
# Who may connect
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["valid", "no certificate", "other CA", "expired"])
def test_only_current_certificates_from_our_ca_connect(
    mq: Broker, case: str, tmp_path: Path
) -> None:
    meter_id, identity = mq.meter("conn")
    if case == "no certificate":
        identity = None
    elif case == "other CA":
        identity = ThrowawayCa(PkiLayout(tmp_path / "other")).issue(tmp_path / "o", meter_id)
    elif case == "expired":
        identity = mq.ca.issue(
            tmp_path / "x", meter_id, not_after=datetime.now(UTC) - timedelta(days=1)
        )
    assert mq.peer(identity).connect() is (case == "valid")


def test_admin_listener_takes_only_the_admin_password(mq: Broker) -> None:
    def admin_peer(username: str | None, password: str | None = None) -> Peer:
        peer = Peer(port=mq.env.mqtt_admin_port, ca=None, identity=None, client_id="admin-t")
        if username is not None:
            peer.client.username_pw_set(username, password)
        mq.peers.append(peer)
        return peer

    assert not admin_peer(ADMIN_USERNAME, "wrong").connect()
    assert not admin_peer(None).connect()
    assert not admin_peer(INGEST, "").connect()
    admin = admin_peer(ADMIN_USERNAME, admin_password(mq.files))
    assert admin.connect()
    # Its plugin role grants $CONTROL only; the plugin's defaults and the ACL deny the rest.
    assert admin.publish("meters/m-1/readings", b"x") == NOT_AUTHORIZED
    assert admin.publish("verified/m-1/readings", b"x") == NOT_AUTHORIZED


# ---------------------------------------------------------------------------------------
# Who may publish and read what
# ---------------------------------------------------------------------------------------


def test_meter_reading_reaches_ingest_through_the_shared_subscription(mq: Broker) -> None:
    meter_id, identity = mq.meter("share")
    ingest = mq.connected(mq.pki.service(INGEST))
    ingest.subscribe("$share/ingest/meters/+/readings")
    meter = mq.connected(identity)

    assert meter.publish(f"meters/{meter_id}/readings", b"reading-1") == 0
    message = ingest.next_message()
    assert (message.topic, message.payload) == (f"meters/{meter_id}/readings", b"reading-1")


def test_meter_cannot_publish_as_another_meter(mq: Broker) -> None:
    meter_id, identity = mq.meter("spoof")
    victim, _ = mq.meter("victim")
    ingest = mq.connected(mq.pki.service(INGEST))
    ingest.subscribe("$share/ingest/meters/+/readings")
    meter = mq.connected(identity)

    assert meter.publish(f"meters/{victim}/readings", b"forged") == NOT_AUTHORIZED
    assert meter.publish(f"meters/{meter_id}/readings", b"own") == 0
    assert ingest.next_message().payload == b"own"
    ingest.assert_no_message()


def test_meter_reads_only_its_own_receipts(mq: Broker) -> None:
    meter_id, identity = mq.meter("reader")
    other_id, other_identity = mq.meter("other")
    meter = mq.connected(identity)
    meter.subscribe(
        f"meters/{other_id}/receipts",
        "meters/+/readings",
        "verified/#",
        "ledger/#",
        f"meters/{meter_id}/receipts",
    )
    ingest = mq.connected(mq.pki.service(INGEST))
    bridge = mq.connected(mq.pki.service("bridge"))
    other = mq.connected(other_identity)

    assert ingest.publish(f"meters/{other_id}/receipts", b"other receipt") == 0
    assert ingest.publish(f"verified/{other_id}/readings", b"verified") == 0
    assert bridge.publish("ledger/epochs", b"epoch") == 0
    assert other.publish(f"meters/{other_id}/readings", b"reading") == 0
    assert ingest.publish(f"meters/{meter_id}/receipts", b"own receipt") == 0

    message = meter.next_message()
    assert (message.topic, message.payload) == (f"meters/{meter_id}/receipts", b"own receipt")
    meter.assert_no_message()


def test_integrator_reads_its_own_feed_and_ledger_and_publishes_nothing(mq: Broker) -> None:
    """The raw verified stream is for services: an integrator's `verified/#` receives
    nothing, its own consented feed everything the workers put there, another
    integrator's feed nothing (docs/consent.md)."""
    meter_id, _ = mq.meter("integ")
    integrator = mq.connected(mq.pki.integrator(INTEGRATOR))
    integrator.subscribe("verified/#", "ledger/#", "integrators/#")
    ingest = mq.connected(mq.pki.service(INGEST))
    bridge = mq.connected(mq.pki.service("bridge"))

    for topic in (
        f"verified/{meter_id}/readings",
        f"integrators/{INTEGRATOR}/verified/{meter_id}/readings",
        "ledger/epochs",
        f"meters/{INTEGRATOR}/readings",
        f"meters/{meter_id}/readings",
        f"meters/{meter_id}/receipts",
    ):
        assert integrator.publish(topic, b"x") == NOT_AUTHORIZED, topic

    assert ingest.publish(f"verified/{meter_id}/readings", b"raw") == 0
    assert ingest.publish(f"integrators/someone-else/verified/{meter_id}/readings", b"no") == 0
    own = f"integrators/{INTEGRATOR}/verified/{meter_id}/readings"
    assert ingest.publish(own, b"consented") == 0
    message = integrator.next_message()
    assert (message.topic, message.payload) == (own, b"consented")
    assert bridge.publish("ledger/epochs", b"epoch") == 0
    assert integrator.next_message().topic == "ledger/epochs"
    integrator.assert_no_message()


def test_an_integrator_with_a_dotted_name_gets_its_own_rights_not_a_meters(
    mq: Broker,
) -> None:
    """The PKI issues `.name` integrators; rendered without a block of their own they
    would get the meter patterns (publish readings as meter `.name`, no feed)."""
    assert f"user {DOTTED_INTEGRATOR}\n" in mq.files.acl.read_text()
    meter_id, _ = mq.meter("dotted")
    integrator = mq.connected(mq.pki.integrator(DOTTED_INTEGRATOR))
    integrator.subscribe(f"integrators/{DOTTED_INTEGRATOR}/verified/#")
    ingest = mq.connected(mq.pki.service(INGEST))

    for topic in (f"meters/{DOTTED_INTEGRATOR}/readings", f"meters/{meter_id}/readings"):
        assert integrator.publish(topic, b"x") == NOT_AUTHORIZED, topic
    feed = f"integrators/{DOTTED_INTEGRATOR}/verified/{meter_id}/readings"
    assert ingest.publish(feed, b"consented") == 0
    assert integrator.next_message().payload == b"consented"


def test_bridge_writes_ledger_only(mq: Broker) -> None:
    meter_id, _ = mq.meter("bridge")
    bridge = mq.connected(mq.pki.service("bridge"))
    assert bridge.publish("ledger/epochs", b"epoch") == 16  # accepted, nobody listening
    for topic in (
        f"verified/{meter_id}/readings",
        f"meters/{meter_id}/receipts",
        "meters/bridge/readings",
    ):
        assert bridge.publish(topic, b"x") == NOT_AUTHORIZED, topic


def test_the_api_writes_verified_copies_and_integrator_feeds_and_reads_nothing(
    mq: Broker,
) -> None:
    """The HTTP API republishes what its in-process worker announces: the verified copy
    (the bridge reads it) and an integrator's consented copy. It may not receipt, forge a
    meter's reading or an epoch, nor read anything at all."""
    meter_id, identity = mq.meter("via-http")
    api = mq.connected(mq.pki.service("api"))
    api.subscribe("#", "meters/+/readings", "verified/#", "integrators/#", "ledger/#")
    bridge = mq.connected(mq.pki.service("bridge"))
    bridge.subscribe("verified/#")
    integrator = mq.connected(mq.pki.integrator(INTEGRATOR))
    integrator.subscribe(f"integrators/{INTEGRATOR}/verified/#")

    verified = f"verified/{meter_id}/readings"
    assert api.publish(verified, b"verified") == 0
    assert (bridge.next_message().topic, bridge.messages.empty()) == (verified, True)
    feed = f"integrators/{INTEGRATOR}/verified/{meter_id}/readings"
    assert api.publish(feed, b"consented") == 0
    message = integrator.next_message()
    assert (message.topic, message.payload) == (feed, b"consented")
    for topic in (
        f"meters/{meter_id}/receipts",
        f"meters/{meter_id}/readings",
        "meters/api/readings",
        "ledger/epochs",
        f"integrators/{INTEGRATOR}/ledger",
    ):
        assert api.publish(topic, b"x") == NOT_AUTHORIZED, topic

    meter = mq.connected(identity)
    assert meter.publish(f"meters/{meter_id}/readings", b"r") in (0, 16)
    ingest = mq.connected(mq.pki.service(INGEST))
    assert ingest.publish(f"meters/{meter_id}/receipts", b"receipt") == 0
    assert ingest.publish(verified, b"from a worker") == 0
    assert bridge.publish("ledger/epochs", b"epoch") == 0
    api.assert_no_message()


def test_admin_certificate_cannot_command_the_broker(mq: Broker) -> None:
    """The PKI's `admin` service certificate is not the dynamic-security admin account."""
    admin = mq.connected(mq.pki.service("admin"))
    command = b'{"commands": [{"command": "listClients"}]}'
    assert admin.publish("$CONTROL/dynamic-security/v1", command) == NOT_AUTHORIZED
    assert admin.publish("meters/admin/readings", b"x") == NOT_AUTHORIZED


def test_flow_limits_reach_the_clients(mq: Broker) -> None:
    meter_id, identity = mq.meter("limits")
    meter = mq.peer(identity)
    assert meter.connect(keepalive=3600)
    assert meter.connack_properties is not None
    assert meter.connack_properties.ReceiveMaximum == 10000
    assert meter.connack_properties.ServerKeepAlive == 300
    assert meter.connack_properties.MaximumPacketSize == 8192

    assert meter.publish(f"meters/{meter_id}/readings", b"r" * 4096) in (0, 16)
    meter.client.publish(f"meters/{meter_id}/readings", b"r" * 8192, qos=1)
    assert meter.disconnected.get(timeout=WAIT).getName() == "Packet too large"


# ---------------------------------------------------------------------------------------
# Revocation
# ---------------------------------------------------------------------------------------


def test_revocation_cuts_the_open_connection_and_refuses_reconnects(mq: Broker) -> None:
    meter_id, identity = mq.meter("revoked")
    bystander_id, bystander_identity = mq.meter("bystander")
    meter = mq.connected(identity)
    bystander = mq.connected(bystander_identity)

    mq.ca.revoke(identity)
    enforce_revocation(meter_id, mq.env)

    assert meter.disconnected.get(timeout=WAIT).getName() == "Administrative action"
    assert not mq.peer(identity).connect()
    assert bystander.disconnected.empty()
    assert bystander.publish(f"meters/{bystander_id}/readings", b"still here") in (0, 16)


def _replace(path: Path, text: str) -> None:
    """As `render` writes: a reload never reads half a file (it read "topi" once)."""
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    part.replace(path)


def test_a_revocation_during_the_previous_reload_is_not_lost(
    mq: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mosquitto drops a SIGHUP that arrives while it handles the previous one (in 10 of
    10 tries sent as soon as that one's reload was logged), which would leave this
    revocation's CRL unread: `reload_broker` signals again until a reload begins after
    its call. The padded ACL's reload took over 5 s (the bound) once, on a loaded
    machine: the bound is longer here, as the padding is this test's own."""
    monkeypatch.setattr(broker_admin, "TIMEOUT", 30.0)
    _, first = mq.meter("revoked-first")
    meter_id, identity = mq.meter("revoked-right-after")
    meter = mq.connected(identity)
    acl = mq.files.acl.read_text()
    # a reload long enough to signal into: 20,000 more ACL users to read (none connects)
    _replace(mq.files.acl, acl + "".join(f"user nobody-{i}\ntopic read x\n" for i in range(20_000)))
    before = mq.files.log.read_bytes().count(RELOADING)
    mq.ca.revoke(first)
    try:
        os.kill(int(mq.files.pid.read_text().split()[0]), signal.SIGHUP)  # the first one's
        wait_until(lambda: mq.files.log.read_bytes().count(RELOADING) == before + 1,
                   what="the first reload under way", within_s=5, every_s=0.001)  # fmt: skip
        mq.ca.revoke(identity)
        enforce_revocation(meter_id, mq.env)
    finally:
        _replace(mq.files.acl, acl)

    assert mq.files.log.read_bytes().count(RELOADING) >= before + 2
    assert meter.disconnected.get(timeout=WAIT).getName() == "Administrative action"
    assert not mq.peer(identity).connect()


def test_refresh_crl_brings_back_the_clients_an_expired_crl_locked_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stack that outlives its CRL (30 days without a revocation or a `stack up`) refuses
    every client: `certs refresh-crl`, run daily, re-signs it and has the running broker
    read it, so a valid meter connects again and a revoked one still does not."""
    pki = PkiLayout(tmp_path / "pki")
    init_pki(pki, ca_key="ec-p384", ingest_workers=1)
    meter, revoked = issue_device(pki, "m-valid"), issue_device(pki, "m-revoked")
    crl.revoke(pki, "m-revoked")
    monkeypatch.setattr(crl, "CRL_VALIDITY", timedelta(minutes=-1))  # expired a minute ago
    crl.refresh_crl(pki)
    monkeypatch.undo()
    with _running_broker(pki, tmp_path / "run") as (_files, env):
        peers: list[Peer] = []

        def connects(identity: IdentityFiles) -> bool:
            peers.append(Peer(port=env.mqtt_port, ca=pki.ca_cert, identity=identity,
                              client_id=f"t-{uuid.uuid4().hex[:12]}"))  # fmt: skip
            return peers[-1].connect()

        try:
            assert not connects(meter), "an expired CRL refuses every client"
            env_file = tmp_path / "stack.env"
            env.write(env_file)
            args = ["--pki-root", str(pki.root), "refresh-crl", "--stack-env", str(env_file)]
            result = CliRunner().invoke(certs_cli, args)
            assert result.exit_code == 0, result.output
            assert "re-signed; valid until " in result.output
            assert "broker: the new CRL is in force" in result.output
            assert connects(meter)
            assert not connects(revoked)
        finally:
            for peer in peers:
                peer.close()


def test_revocation_without_a_running_broker_says_so(tmp_path: Path) -> None:
    env = StackEnv(run_dir=tmp_path, mqtt_admin_port=1)
    with pytest.raises(BrokerNotRunningError):
        enforce_revocation("m-1", env)
    with pytest.raises(ValueError, match="invalid identity"):
        enforce_revocation("a/b", env)


# ---------------------------------------------------------------------------------------
# Two gaps of Mosquitto 2.0.11 with a file ACL, and what closes them
# ---------------------------------------------------------------------------------------


def test_a_meter_that_cannot_name_the_share_group_takes_no_readings(mq: Broker) -> None:
    """acl_file grants every SUBSCRIBE, so a meter in the workers' group would take a
    round-robin share of readings the broker then drops (it may not read them). The group
    name is a per-deployment secret (stack.env's share_group); a meter guessing the old
    default name, or a wildcard for it, joins a group of its own and takes nothing."""
    group = new_share_group()
    _, intruder_identity = mq.meter("intruder")
    meter_id, identity = mq.meter("honest")
    ingest = mq.connected(mq.pki.service(INGEST))
    ingest.subscribe(f"$share/{group}/meters/+/readings")
    intruder = mq.connected(intruder_identity)
    intruder.subscribe("$share/ingest/meters/+/readings", "$share/+/meters/+/readings")
    intruder.client.subscribe("$share/#", qos=1)  # not a valid filter; granted or refused
    intruder.subacks.get(timeout=WAIT)
    meter = mq.connected(identity)

    for n in range(8):
        assert meter.publish(f"meters/{meter_id}/readings", b"%d" % n) == 0
    received = [ingest.next_message().payload for _ in range(8)]
    assert received == [b"%d" % n for n in range(8)]
    intruder.assert_no_message()


def test_a_meter_cannot_take_over_a_worker_session(mq: Broker) -> None:
    """use_username_as_clientid: the broker replaces the client id a client sends with its
    certificate CN, so a meter sending a worker's client id gets its own session, and the
    worker gets its session back whatever client id it sends."""
    group = new_share_group()
    meter_id, identity = mq.meter("takeover")
    worker = mq.peer(mq.pki.service(INGEST), client_id=INGEST)
    try:
        assert worker.connect(clean_start=False, session_expiry=600)
        worker.subscribe(f"$share/{group}/meters/+/readings")
        worker.close()
        meter = mq.connected(identity)
        assert meter.publish(f"meters/{meter_id}/readings", b"queued") == 0
        intruder = mq.peer(identity, client_id=INGEST)
        assert intruder.connect(clean_start=False, session_expiry=600)
        intruder.assert_no_message()
        intruder.close()

        worker = mq.peer(mq.pki.service(INGEST), client_id=f"anything-{uuid.uuid4().hex}")
        assert worker.connect(clean_start=False, session_expiry=600)
        assert worker.next_message().payload == b"queued"
    finally:
        # End the persistent session, or it would take a share of later tests' readings.
        worker.close()
        cleanup = mq.peer(mq.pki.service(INGEST), client_id=INGEST)
        assert cleanup.connect(clean_start=True, session_expiry=0)


def test_a_second_connection_with_one_certificate_replaces_the_first(mq: Broker) -> None:
    """The price of binding client ids to certificates: one connection per certificate,
    hence one certificate per ingest worker (two workers on one would evict each other)."""
    first = mq.connected(mq.pki.service("ingest-1"), client_id="worker-a")
    second = mq.connected(mq.pki.service("ingest-1"), client_id="worker-b")
    first.disconnected.get(timeout=WAIT)  # 2.0.11 closes it without a reason code
    assert second.disconnected.empty()


def test_the_retired_shared_ingest_identity_has_no_rights(mq: Broker) -> None:
    meter_id, identity = mq.meter("retired")
    legacy = mq.connected(mq.pki.service("ingest"))
    legacy.subscribe("meters/+/readings")
    meter = mq.connected(identity)
    assert meter.publish(f"meters/{meter_id}/readings", b"r") in (0, 16)
    legacy.assert_no_message()
    assert legacy.publish(f"meters/{meter_id}/receipts", b"x") == NOT_AUTHORIZED
    assert legacy.publish(f"verified/{meter_id}/readings", b"x") == NOT_AUTHORIZED
