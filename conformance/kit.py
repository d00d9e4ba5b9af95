"""A live run against a vendor's meter on a private stack: our Mosquitto config with its
TLS, a PostgreSQL cluster of the run's own with the meter registered, and a real ingest
worker process (conformance/private.py); then an `Observation` for the checks.

The kit watches through the broker with an identity of its own that may read the meter's
readings and receipts topics (one ACL block added to the run's ACL file): it records
every copy of every reading and every receipt the worker sent, when it saw them. It
withholds receipts by pausing the worker. The phases:

1. normal: receipts flow;
2. silence: the worker paused, so an unreceipted reading must come again, unchanged;
   then the worker resumes and receipts what waited (the copies as `duplicate`);
3. outage: the worker paused and the broker stopped (writing its sessions to disk), a
   plain TCP listener on its port counts the meter's connection attempts and closes each
   at once, then the broker starts again, the worker resumes, and the kit waits for the
   meter to reconnect and publish;
4. power cut: the worker paused, the meter command killed (SIGKILL of its process
   group) and started again on the same state; the worker resumes only after the
   meter's outbox had its turn, so what it had not had receipted must have come again.

Connect and subscribe records come from the broker's log, with `log_type subscribe`
added to the rendered config; the log is tailed while the run goes, since its own
timestamps are whole seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from meterproof.certs.bootstrap import init_pki
from meterproof.certs.identities import issue_device
from meterproof.certs.layout import DeviceFiles, PkiLayout
from meterproof.certs.tls import client_context
from meterproof.config import StackEnv, new_share_group
from meterproof.conformance.observations import (
    Connected,
    Observation,
    Published,
    ReceiptSent,
    Subscribed,
    Window,
    parse_log_line,
)
from meterproof.conformance.private import PrivateStack
from meterproof.conformance.vendor import VendorIdentity, accept, trust_bundle
from meterproof.errors import UnavailableError
from meterproof.mosquitto.config import BrokerFiles, render
from meterproof.schemas import topics
from meterproof.schemas.reading import Alg
from meterproof.schemas.signatures import PublicKey, load_public_key
from meterproof.schemas.timestamps import wall_ms
from meterproof.stack.broker import BrokerServer
from meterproof.stack.commands import stop_command
from meterproof.stack.process import LOOPBACK, free_port

#: The variables a meter command is started with (docs/conformance.md, `--help`).
ENV_PREFIX: Final = "METERPROOF_CONFORMANCE_"
#: The kit's watching identity: an ingest certificate (readings) that the run's ACL also
#: lets read receipts; the worker is ingest-0.
OBSERVER: Final = "ingest-1"
_LOG_POLL_S: Final = 0.05
_STOP_GRACE_S: Final = 5.0
#: After a restart, how long the kit waits for the outbox once the meter publishes again.
REPUBLISH_WAIT_S: Final = 4.0
#: How the kit hears the meter's readings as the meter sent them: at up to QoS 2, so a
#: reading at QoS 0 or 2 keeps its QoS, with the retain flag as published (by default a
#: broker clears it on delivery), and without retained copies on each (re)subscribe.
READINGS_AS_SENT: Final = SubscribeOptions(
    qos=2, retainAsPublished=True, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND
)


@dataclass(frozen=True, slots=True)
class Phases:
    """Seconds per phase; 0 leaves a phase out (its checks are then skipped)."""

    connect_timeout_s: float = 20.0
    normal_s: float = 8.0
    silence_s: float = 10.0
    outage_s: float = 8.0
    reconnect_wait_s: float = 20.0
    power_cut_s: float = 5.0

    def __post_init__(self) -> None:
        if self.normal_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("the normal phase and the connect timeout must be positive")
        if min(self.silence_s, self.outage_s, self.reconnect_wait_s, self.power_cut_s) < 0:
            raise ValueError("phase lengths cannot be negative")


@dataclass(frozen=True, slots=True)
class VendorKey:
    """The meter's own signing key (public half), when the vendor does not take the kit's."""

    pem: bytes
    alg: Alg


@dataclass(frozen=True, slots=True)
class MeterCommand:
    command: str
    meter_id: str | None = None
    key: VendorKey | None = None
    alg: Alg = Alg.EDDSA
    #: The vendor's own TLS identity, instead of one the kit issues.
    identity: VendorIdentity | None = None


Progress = Callable[[str], None]


@dataclass(slots=True)
class _Recorder:
    """What the paho thread and the log tailer record, behind one lock."""

    t0: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    published: list[Published] = field(default_factory=list)
    connects: list[Connected] = field(default_factory=list)
    subscribes: list[Subscribed] = field(default_factory=list)
    receipts: list[ReceiptSent] = field(default_factory=list)
    attempts: list[float] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def copy_to(self, obs: Observation) -> None:
        with self.lock:
            obs.published = list(self.published)
            obs.connects = list(self.connects)
            obs.subscribes = list(self.subscribes)
            obs.receipts = list(self.receipts)
            obs.attempts = list(self.attempts)


class _Observer:
    """The kit's eyes on the broker: every reading the meter publishes and every receipt
    the worker sends it, with when the kit saw them."""

    def __init__(self, rec: _Recorder, *, layout: PkiLayout, port: int, meter_id: str) -> None:
        self._rec = rec
        self._readings = topics.readings(meter_id)
        self._receipts = topics.receipts(meter_id)
        self._subscribed = threading.Event()
        self._layout = layout
        self._port = port
        self._client: mqtt.Client | None = None

    def start(self) -> None:
        """Connect (again) with the same persistent session; a fresh paho client each
        time, since a second `loop_start` on one client leaks its socket pair."""
        files = self._layout.service(OBSERVER)
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=OBSERVER, protocol=mqtt.MQTTv5)
        client.tls_set_context(
            client_context(ca_cert=self._layout.ca_cert, cert=files.cert, key=files.key)
        )
        client.on_connect = self._connected
        client.on_subscribe = lambda *_: self._subscribed.set()
        client.on_message = self._message
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 600
        self._subscribed.clear()
        client.connect(LOOPBACK, self._port, clean_start=False, properties=properties)
        client.loop_start()
        self._client = client
        if not self._subscribed.wait(10):
            raise UnavailableError("broker", "the kit's subscription was not acknowledged")

    def stop(self) -> None:
        """Disconnect, keeping the session."""
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def _connected(
        self, client: mqtt.Client, _u: object, _f: object, reason: ReasonCode, _p: object
    ) -> None:
        if not reason.is_failure:
            client.subscribe(
                [(self._readings, READINGS_AS_SENT), (self._receipts, SubscribeOptions(qos=1))]
            )

    def _message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        payload = bytes(message.payload)
        with self._rec.lock:
            at = self._rec.now()
            if message.topic == self._receipts:
                self._rec.receipts.append(_receipt(at, payload))
                return
            self._rec.published.append(
                Published(
                    at,
                    message.topic,
                    payload,
                    qos=message.qos,
                    retain=bool(message.retain),
                    wall_ms=wall_ms(),
                )
            )


def _receipt(at_s: float, body: bytes) -> ReceiptSent:
    """A receipt as the report shows it: its reason when rejected, else its status."""
    try:
        fields = json.loads(body)
        return ReceiptSent(
            at_s, fields.get("seq"), fields.get("reading_hash"),
            str(fields.get("reason") or fields.get("status")),
        )  # fmt: skip
    except (ValueError, AttributeError):
        return ReceiptSent(at_s, None, None, "unreadable receipt")


class _LogTail:
    """Reads the broker's log as it grows and keeps the meter's connect/subscribe lines."""

    def __init__(self, rec: _Recorder, path: Path, meter_id: str) -> None:
        self._rec = rec
        self._path = path
        self._meter_id = meter_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="conformance-log", daemon=True)
        self._offset = path.stat().st_size if path.exists() else 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Also when it never started (the broker did not): the run's own error stands."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._read()

    def _run(self) -> None:
        while not self._stop.wait(_LOG_POLL_S):
            self._read()

    def _read(self) -> None:
        if not self._path.exists():
            return
        with self._path.open("rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        end = chunk.rfind(b"\n") + 1
        self._offset += end
        at = self._rec.now()
        for raw in chunk[:end].decode("utf-8", "replace").splitlines():
            record = parse_log_line(at, raw)
            if record is None or record.client_id != self._meter_id:
                continue
            with self._rec.lock:
                if isinstance(record, Connected):
                    self._rec.connects.append(record)
                else:
                    self._rec.subscribes.append(record)


class _Doorman:
    """Stands on the broker's port while it is down: takes each connection attempt, notes
    when, and closes it at once, as a broker that is not there yet would fail it."""

    def __init__(self, rec: _Recorder, port: int) -> None:
        self._rec = rec
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((LOOPBACK, port))
        self._sock.listen(64)
        self._sock.settimeout(_LOG_POLL_S)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="conformance-door", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._rec.lock:
                self._rec.attempts.append(self._rec.now())
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()


def _private_broker(
    run_dir: Path, layout: PkiLayout, vendor: VendorIdentity | None
) -> tuple[BrokerServer, BrokerFiles]:
    """Our broker config, logging subscribes too; with a vendor identity its `cafile` is
    our CA plus the vendor's, and it has no `crlfile`: Mosquitto then checks every client
    certificate against a CRL of its issuer, and the kit has none of the vendor's."""
    port = free_port()
    cafile = None if vendor is None else trust_bundle(layout.ca_cert, vendor, run_dir / "trust.pem")
    files = render(run_dir=run_dir, pki=layout, tls_port=port, admin_port=None, cafile=cafile)
    conf = files.conf.read_text(encoding="utf-8")
    marker = "log_type information\n"
    if marker not in conf:
        raise RuntimeError("the broker template no longer logs information lines")
    conf = conf.replace(marker, marker + "log_type subscribe\n")
    if vendor is not None:
        lines = conf.splitlines(keepends=True)
        conf = "".join(line for line in lines if not line.startswith("crlfile "))
    files.conf.write_text(conf, encoding="utf-8")
    with files.acl.open("a", encoding="utf-8") as acl:  # Mosquitto merges a user's blocks
        acl.write(f"\n# The conformance kit watches receipts too.\nuser {OBSERVER}\n"
                  f"topic read {topics.RECEIPTS_FILTER}\n")  # fmt: skip
    return BrokerServer(files, port=port, admin_port=free_port()), files


def _install_vendor_identity(device: DeviceFiles, vendor: VendorIdentity) -> None:
    """The vendor's certificate (and key, if given) in place of the kit's, so the meter
    command finds them where the variables say; the kit's TLS key goes if it is not
    replaced, since it does not match the vendor's certificate."""
    device.cert.write_bytes(vendor.cert.read_bytes())
    if vendor.key is not None:
        device.key.write_bytes(vendor.key.read_bytes())
    else:
        device.key.unlink(missing_ok=True)


def meter_environment(
    *, env: StackEnv, layout: PkiLayout, meter_id: str, alg: Alg, issued_key: bool, run_dir: Path
) -> dict[str, str]:
    """The meter command's environment: the caller's, without its METERPROOF_* variables
    (a sourced stack.env must not send the reference meter to another broker), plus where
    to connect and with what."""
    device = layout.device(meter_id)
    ours = {
        "METERPROOF_STACK_ENV": str(run_dir / "stack.env"),
        f"{ENV_PREFIX}MQTT_HOST": env.mqtt_host,
        f"{ENV_PREFIX}MQTT_PORT": str(env.mqtt_port),
        f"{ENV_PREFIX}CA_CERT": str(layout.ca_cert),
        f"{ENV_PREFIX}CERT": str(device.cert),
        f"{ENV_PREFIX}METER_ID": meter_id,
        f"{ENV_PREFIX}ALG": alg.value,
        f"{ENV_PREFIX}STATE_DIR": str(run_dir / "meter-state"),
    }
    if device.key.exists():  # not when a vendor brought its certificate without the key
        ours[f"{ENV_PREFIX}KEY"] = str(device.key)
    if issued_key:
        ours[f"{ENV_PREFIX}SIGNING_KEY"] = str(device.signing_key)
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("METERPROOF_")}
    return inherited | ours


class _MeterProcess:
    """The vendor's command in its own process group: started, its power cut (SIGKILL of
    the whole group, no chance to save anything), started again, stopped at the end with
    SIGTERM then SIGKILL."""

    def __init__(self, command: str, environment: dict[str, str], log: IO[bytes]) -> None:
        self._command = command
        self._environment = environment
        self._log = log
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(  # noqa: S602 - the vendor's own command, by design
            self._command,
            shell=True,
            env=self._environment,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def cut_power(self) -> None:
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()

    def stop(self) -> None:
        if self._process is not None:
            stop_command(self._process, timeout_s=_STOP_GRACE_S)


def _wait(predicate: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(_LOG_POLL_S)
    return predicate()


def _settle(rec: _Recorder, *, quiet_s: float = 1.0, most_s: float = 15.0) -> None:
    """Until the worker's receipts stop coming (it answers every copy, even a rejected
    one), so what it stored is final."""
    deadline = time.monotonic() + most_s
    seen = -1
    while time.monotonic() < deadline:
        with rec.lock:
            count = len(rec.receipts)
        if count == seen:
            return
        seen = count
        time.sleep(quiet_s)


def _identities(meter: MeterCommand, layout: PkiLayout) -> tuple[str, Alg, PublicKey]:
    """The run's PKI and the meter's id, algorithm and signing key; a vendor identity is
    checked (and refused) before anything starts."""
    if meter.identity is not None:
        meter_id = accept(meter.identity, meter.meter_id)
    else:
        meter_id = meter.meter_id or f"conformance-{uuid.uuid4().hex[:12]}"
    init_pki(layout, ca_key="ec-p384", ingest_workers=2)  # the worker and the observer
    alg = meter.key.alg if meter.key is not None else meter.alg
    issue_device(layout, meter_id, alg=alg, rsa_bits=2048)  # the signing key, if ours
    if meter.identity is not None:
        _install_vendor_identity(layout.device(meter_id), meter.identity)
    pem = meter.key.pem if meter.key else layout.device(meter_id).signing_pub.read_bytes()
    return meter_id, alg, load_public_key(alg, pem)


def run_meter(
    meter: MeterCommand,
    *,
    run_dir: Path,
    phases: Phases,
    progress: Progress,
    keep_database: bool = False,
) -> Observation:
    """Run the phases against the vendor's meter command; everything lives in `run_dir`
    (the database cluster too, unless as root it had to live elsewhere: see
    stack/postgres.py), and the cluster is deleted at the end unless `keep_database`."""
    run_dir = run_dir.absolute()
    layout = PkiLayout(run_dir / "pki")
    meter_id, alg, key = _identities(meter, layout)
    broker, files = _private_broker(run_dir, layout, meter.identity)
    env = StackEnv.defaults(run_dir=run_dir, pki_root=layout.root, mqtt_port=broker.port)
    env.write(run_dir / "stack.env")  # for the reference meter: no database, no share group
    stack = PrivateStack(run_dir, env.model_copy(update={"share_group": new_share_group()}))
    environment = meter_environment(
        env=env,
        layout=layout,
        meter_id=meter_id,
        alg=alg,
        issued_key=meter.key is None,
        run_dir=run_dir,
    )
    rec = _Recorder(time.monotonic())
    obs = Observation(meter_id, key, live=True)
    whose = "the vendor's CA" if meter.identity is not None else "the kit's CA"
    progress(f"meter {meter_id} ({alg}, TLS identity from {whose}), files in {run_dir}")
    observer = _Observer(rec, layout=layout, port=broker.port, meter_id=meter_id)
    tail = _LogTail(rec, files.log, meter_id)
    try:
        # the broker first: its port was drawn just now, and the database's start takes
        # seconds in which another process may take a free port
        broker.start()
        tail.start()
        stack.start_database(meter_id, key)
        progress(f"PostgreSQL {stack.database.url} migrated, the meter registered")
        stack.start_worker(broker_lost_exit_s=phases.outage_s + 60)
        progress(f"broker {broker.url}, ingest worker subscribed (log {stack.worker_log})")
        observer.start()
        with (run_dir / "meter.log").open("wb") as log:
            process = _MeterProcess(meter.command, environment, log)
            process.start()
            try:
                progress(f"meter command started, output in {run_dir / 'meter.log'}")
                if not _wait(lambda: bool(rec.published), phases.connect_timeout_s):
                    progress(f"no reading within {phases.connect_timeout_s:.0f} s; stopping")
                else:
                    _phases(rec, obs, observer=observer, broker=broker, stack=stack,
                            process=process, phases=phases, progress=progress)  # fmt: skip
            finally:
                process.stop()
        _settle(rec)
        obs.stored = stack.stored(meter_id)
        progress(f"the worker stored {obs.stored} readings of the meter")
    finally:
        with contextlib.suppress(Exception):
            observer.stop()
        tail.stop()
        stack.close(keep_database=keep_database)
        if broker.is_running():
            broker.stop()
    rec.copy_to(obs)
    return obs


def _phases(
    rec: _Recorder,
    obs: Observation,
    *,
    observer: _Observer,
    broker: BrokerServer,
    stack: PrivateStack,
    process: _MeterProcess,
    phases: Phases,
    progress: Progress,
) -> None:
    progress(f"phase normal: {phases.normal_s:.0f} s, receipts flow")
    time.sleep(phases.normal_s)
    if phases.silence_s:
        progress(f"phase silence: {phases.silence_s:.0f} s, the worker paused")
        start = rec.now()
        stack.pause()
        time.sleep(phases.silence_s)
        obs.silence = Window(start, rec.now())
        stack.resume()
        progress("the worker resumed")
        time.sleep(1.0)
    if phases.outage_s:
        _outage(rec, obs, observer=observer, broker=broker, stack=stack, phases=phases,
                progress=progress)  # fmt: skip
    if phases.power_cut_s:
        _power_cut(rec, obs, stack=stack, process=process, phases=phases, progress=progress)


def _outage(
    rec: _Recorder,
    obs: Observation,
    *,
    observer: _Observer,
    broker: BrokerServer,
    stack: PrivateStack,
    phases: Phases,
    progress: Progress,
) -> None:
    """The broker away: only the meter may knock on its port meanwhile, so the kit's
    observer leaves and the worker is paused (its own reconnects must not count)."""
    progress(f"phase outage: broker down {phases.outage_s:.0f} s, counting reconnects")
    observer.stop()
    stack.pause()
    broker.stop()
    start = rec.now()
    door = _Doorman(rec, broker.port)
    time.sleep(phases.outage_s)
    door.close()
    broker.start()
    obs.outage = Window(start, rec.now())
    stack.resume()
    observer.start()
    obs.reconnect_wait_s = phases.reconnect_wait_s
    outage = obs.outage

    def back() -> bool:
        with rec.lock:
            return any(c.at_s > outage.end_s for c in rec.connects) and any(
                p.at_s > outage.end_s for p in rec.published
            )

    progress("broker back; waiting for the meter to reconnect and publish")
    if _wait(back, phases.reconnect_wait_s):
        time.sleep(1.0)  # a moment for its receipt subscription and outbox
    else:
        progress(f"the meter did not come back within {phases.reconnect_wait_s:.0f} s")


def _power_cut(
    rec: _Recorder,
    obs: Observation,
    *,
    stack: PrivateStack,
    process: _MeterProcess,
    phases: Phases,
    progress: Progress,
) -> None:
    """Receipts withheld, then the meter's power cut and restored: what it had not had
    receipted must come again (its outbox survived) and its seq must go on (section 11).
    The worker resumes only after the meter's outbox had its turn: a receipt for a reading
    the meter had published before the cut must not spare it the republish."""
    progress(f"phase power cut: the worker paused {phases.power_cut_s:.0f} s, then SIGKILL")
    start = rec.now()
    stack.pause()
    time.sleep(phases.power_cut_s)
    process.cut_power()
    cut = rec.now()
    obs.power_cut = Window(start, cut)
    progress("power restored: the meter command starts again on the same state")
    process.start()

    def publishing() -> bool:
        with rec.lock:
            return any(p.at_s > cut for p in rec.published)

    if _wait(publishing, phases.reconnect_wait_s):
        time.sleep(REPUBLISH_WAIT_S)  # its outbox's turn, on the meter's own timer
    else:
        progress(f"no reading {phases.reconnect_wait_s:.0f} s after the restart")
    stack.resume()
    progress("the worker resumed")
