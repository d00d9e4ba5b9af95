"""Revocation that also cuts the revoked certificate's open connections.

Mosquitto re-reads its CRL on SIGHUP, but only new TLS handshakes see it: a meter that was
connected when its certificate was revoked stays connected. `enforce_revocation` therefore
sends SIGHUP (new handshakes refused) and then asks the dynamic-security plugin to close
every connection whose username (= certificate CN) is the revoked identity.

Measured on Mosquitto 2.0.11 (Debian 12) with the rendered config (TLS listener with
`use_identity_as_username`, `acl_file`, the plugin loaded, a loopback admin listener):

(a) Loading the plugin next to acl_file. Certificate clients are never asked for a
    password, even when the plugin knows their username without one. The plugin is asked
    before acl_file; for a username it does not know it defers, and acl_file decides
    exactly as without the plugin (own readings PUBACK 0, another meter's 135). For a
    username it knows, its roles and then `defaultACLAccess` decide: with the defaults
    `mosquitto_ctrl dynsec init` writes (receive allowed), a meter known to the plugin
    received `verified/#` and another meter's receipts, which acl_file denies. With all
    four defaults false it defers again, so `config.dynsec_config` writes them false and
    the plugin keeps no client but the admin.
(b) Cutting a connection. `createClient X` (no password) followed by `disableClient X` or
    `deleteClient X` closed the open connection of the certificate client X within ~50 ms
    (MQTT 5 DISCONNECT 0x98 "administrative action"). A disabled or deleted client
    reconnected at once with its certificate: "disabled" only stops password logins, so the
    CRL is what refuses the reconnect. After SIGHUP alone the revoked client was still
    connected 1.5 s later. We create and delete in one request, which leaves no plugin
    entry behind that could later change that name's ACLs.
(c) The admin connection. The loopback listener authenticates through the plugin only:
    the right password got CONNACK 0, a wrong one 135, none was refused. `mosquitto_ctrl`
    works there (`mosquitto_ctrl -h 127.0.0.1 -p <admin port> -u 'dynsec:admin'
    -P "$(cat <run_dir>/mosquitto/admin.password)" dynsec listClients`), but it exits 0 on
    "Connection error: Not authorized" and on "Error: Client not found", and its `-o` options
    file did not apply `-h/-p/-u/-P`, so the password would sit on a command line. We send
    the same JSON commands it sends, over paho, and check every response.

SIGHUP only raises a flag that the broker's loop handles before it reads the packets of a
connection opened after the signal, so by the time the kick is processed the new CRL
already refuses the reconnect (tests/test_broker_acl.py reconnects right after the cut).

SIGHUP has a price on Mosquitto 2.0.11: the broker "disconnects" every offline persistent
session once more, which puts it on its session-expiry list twice, and it crashes later
when such a meter comes back or expires (docs/reliability.md, "Mosquitto crashes on its
own"). Run brokers under a service manager that restarts them, or restart them in turn
after a revocation or a new identity.

A SIGHUP that arrives while the broker is still handling the previous one is lost: sent
as soon as the first one's `Reloading config.` was logged, the second was not handled in
10 of 10 tries (2026-12-04). So two revocations in quick succession could leave the
second one's CRL unread. `reload_broker` therefore watches the broker's log for a reload
that began after its signal (Mosquitto logs `Reloading config.` before it reads any
file again) and signals again when none did.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from meterproof.certs.layout import IDENTITY_RE, PkiLayout
from meterproof.config import StackEnv
from meterproof.errors import MeterproofError
from meterproof.mosquitto.config import (
    ADMIN_USERNAME,
    BrokerFiles,
    admin_password,
    broker_files,
    render,
)
from meterproof.pidfile import read_pid

COMMAND_TOPIC: Final = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC: Final = "$CONTROL/dynamic-security/v1/response"
TIMEOUT: Final = 5.0
#: What Mosquitto logs when it starts handling a SIGHUP, before it reads any file.
RELOADING: Final = b"Reloading config."
#: What Mosquitto logs once its signal handlers are in place. Its TLS port accepts a
#: moment before that, and a SIGHUP in between ends the process (the default action).
RUNNING: Final = b" running\n"
#: Without a new `RELOADING` line this long after a SIGHUP, the signal was lost.
_RELOAD_RETRY_S: Final = 1.0
_ALREADY_EXISTS: Final = "Client already exists"

_T = TypeVar("_T")


class BrokerNotRunningError(MeterproofError, ConnectionRefusedError):
    """No live broker behind the run directory's pid file: it loads the CRL when started."""


class BrokerAdminError(MeterproofError, OSError):
    """The broker is running but did not confirm an admin command."""


def enforce_revocation(identity: str, env: StackEnv) -> int:
    """Make every running broker of the stack refuse `identity` from now on and close its
    connections there; return on how many brokers. A broker that is down loads the CRL
    when started; when none runs, BrokerNotRunningError.

    Call after the CRL file has been rewritten. Idempotent: revoking twice is harmless.
    """
    if not IDENTITY_RE.fullmatch(identity):
        raise ValueError(f"invalid identity {identity!r}: 1-64 characters of [A-Za-z0-9._-]")
    running = _reload_running(env)
    for files, admin_port in running:
        _kick(identity, files, admin_port)
    return len(running)


def reload_crl(env: StackEnv) -> int:
    """Make every running broker of the stack read the CRL file again (a re-signed one);
    return on how many. BrokerNotRunningError when none runs."""
    return len(_reload_running(env))


def _reload_running(env: StackEnv) -> list[tuple[BrokerFiles, int]]:
    """`reload_broker` on each broker of the stack; those running, with their admin port."""
    running = []
    for files, admin_port in stack_brokers(env):
        try:
            reload_broker(files)
        except BrokerNotRunningError:
            continue
        running.append((files, admin_port))
    if not running:
        raise BrokerNotRunningError(f"no broker of {env.run_dir} is running")
    return running


def reload_broker(files: BrokerFiles) -> None:
    """SIGHUP the broker and return once a reload has begun after the signal, so it reads
    every file written before this call; signal again when the SIGHUP was lost. Raises
    BrokerNotRunningError when it is not running, BrokerAdminError when no reload began
    within TIMEOUT."""
    offset = log_end(files.log)
    deadline = time.monotonic() + TIMEOUT
    signals = 0
    while time.monotonic() < deadline:
        os.kill(_broker_pid(files), signal.SIGHUP)
        signals += 1
        retry_at = min(deadline, time.monotonic() + _RELOAD_RETRY_S)
        while time.monotonic() < retry_at:
            if logged_after(files.log, offset, RELOADING):
                return
            time.sleep(0.02)
    raise BrokerAdminError(
        f"the broker logged no reload in {TIMEOUT:.0f} s after {signals} SIGHUP(s): {files.log}"
    )


def log_end(log: Path) -> int:
    """Where the broker's next log line will start: the offset for `logged_after`."""
    return log.stat().st_size if log.exists() else 0


def logged_after(log: Path, offset: int, line: bytes) -> bool:
    """Whether the whole lines after `offset` of the broker's log hold `line`."""
    try:
        with log.open("rb") as lines:
            lines.seek(offset)
            new = lines.read()
    except FileNotFoundError:
        return False
    return line in new[: new.rfind(b"\n") + 1]


def stack_brokers(env: StackEnv) -> list[tuple[BrokerFiles, int]]:
    """Each broker of the stack (`StackEnv.brokers`) with its admin port, in order."""
    ports = env.admin_ports()
    if len(ports) != len(env.brokers()):
        raise ValueError(f"{len(env.brokers())} brokers but admin ports {ports}")
    return [(broker_files(env.run_dir, i), port) for i, port in enumerate(ports)]


def _kick(identity: str, files: BrokerFiles, admin_port: int) -> None:
    """Close `identity`'s connections on one broker (see (b) above)."""
    responses = dynsec_commands(
        files,
        admin_port,
        [
            {"command": "createClient", "username": identity},
            {"command": "deleteClient", "username": identity},
        ],
    )
    created, deleted = responses
    if created.get("error") not in (None, _ALREADY_EXISTS) or "error" in deleted:
        raise BrokerAdminError(f"dynamic-security refused to disconnect {identity}: {responses}")


def revoke_on_running_broker(identity: str, stack_env: Path) -> str:
    """Apply a revocation already in the CRL to the stack recorded in `stack_env`, if any,
    and say what happened. Raises OSError when a running broker did not confirm: the caller
    tells the operator to run its command again (revoking twice is harmless)."""
    return _crl_on_running_stack(
        stack_env,
        lambda env: enforce_revocation(identity, env),
        f"{identity} disconnected and refused from now on",
    )


def crl_on_running_broker(stack_env: Path) -> str:
    """`reload_crl` for the stack recorded in `stack_env`, if any; say what happened.
    Raises OSError when a running broker did not confirm."""
    return _crl_on_running_stack(stack_env, reload_crl, "the new CRL is in force")


def _crl_on_running_stack(stack_env: Path, apply: Callable[[StackEnv], int], done: str) -> str:
    """Run `apply` (which returns on how many brokers it acted) on the recorded stack and
    say what happened; a broker that is down reads the CRL file when started."""
    if not stack_env.exists():
        return f"no running stack ({stack_env} absent): the broker loads the CRL when started"
    env = StackEnv.load(stack_env)
    try:
        applied = apply(env)
    except ConnectionRefusedError:
        return "the broker is not running: it loads the CRL when started"
    brokers = len(env.brokers())
    if brokers == 1:
        return f"broker: {done}"
    said = f"{applied} of {brokers} brokers: {done}"
    return said if applied == brokers else f"{said} (a broker down loads the CRL when started)"


def reload_identities(env: StackEnv, pki: PkiLayout) -> None:
    """Render every broker's files again from the PKI's folders and SIGHUP the running
    brokers, so identities issued since the last render (ingest workers, integrators) get
    their rights. The files are rewritten even when a broker is down: it reads them when
    started; BrokerNotRunningError when none runs."""
    running = 0
    for (index, (_, port)), admin_port in zip(
        enumerate(env.brokers()), env.admin_ports(), strict=True
    ):
        files = render(
            run_dir=env.run_dir, pki=pki, tls_port=port, admin_port=admin_port, index=index
        )
        try:
            reload_broker(files)
        except BrokerNotRunningError:
            continue
        running += 1
    if not running:
        raise BrokerNotRunningError(f"no broker of {env.run_dir} is running")


def identities_on_running_broker(pki: PkiLayout, stack_env: Path) -> str:
    """`reload_identities` for the stack recorded in `stack_env`, if it uses this PKI; say
    what happened."""
    if not stack_env.exists():
        return f"no stack recorded ({stack_env} absent): its ACL is rendered by `stack up`"
    env = StackEnv.load(stack_env)
    if env.pki_root.resolve() != pki.root.resolve():
        return f"the stack in {stack_env} uses the PKI {env.pki_root}: its ACL is unchanged"
    try:
        reload_identities(env, pki)
    except ConnectionRefusedError:
        return "broker ACL rendered; the broker is not running and reads it when started"
    return "broker ACL rendered and reloaded: the new identities may connect now"


def dynsec_commands(
    files: BrokerFiles, admin_port: int, commands: list[dict[str, str]]
) -> list[dict[str, object]]:
    """Send dynamic-security commands as the admin account; return one response each.

    Raises ConnectionRefusedError when nothing listens on the admin port.
    """
    tag = secrets.token_hex(8)
    tagged = [{**command, "correlationData": f"{tag}-{i}"} for i, command in enumerate(commands)]
    expected = [command["correlationData"] for command in tagged]
    connected: queue.Queue[ReasonCode] = queue.Queue()
    subscribed = threading.Event()
    replies: queue.Queue[bytes] = queue.Queue()

    def on_connect(
        _c: mqtt.Client, _u: object, _f: mqtt.ConnectFlags, rc: ReasonCode, _p: Properties | None
    ) -> None:
        connected.put(rc)

    def on_subscribe(
        _c: mqtt.Client, _u: object, _m: int, _rc: list[ReasonCode], _p: Properties | None
    ) -> None:
        subscribed.set()

    def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        replies.put(bytes(message.payload))

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"meterproof-admin-{tag}",
        protocol=mqtt.MQTTv5,
    )
    client.username_pw_set(ADMIN_USERNAME, admin_password(files))
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect("127.0.0.1", admin_port, keepalive=30)
    client.loop_start()
    try:
        rc = _get(connected, "CONNACK")
        if rc.is_failure:
            raise BrokerAdminError(f"admin login to 127.0.0.1:{admin_port} refused: {rc}")
        client.subscribe(RESPONSE_TOPIC, qos=1)
        if not subscribed.wait(TIMEOUT):
            raise BrokerAdminError(f"no SUBACK for {RESPONSE_TOPIC} within {TIMEOUT} s")
        client.publish(COMMAND_TOPIC, json.dumps({"commands": tagged}), qos=1)
        while True:
            reply = json.loads(_get(replies, "dynamic-security response"))
            answers: list[dict[str, object]] = reply.get("responses", [])
            if [answer.get("correlationData") for answer in answers] == expected:
                return answers
    finally:
        client.disconnect()
        client.loop_stop()


def _get(source: queue.Queue[_T], what: str) -> _T:
    try:
        return source.get(timeout=TIMEOUT)
    except queue.Empty:
        raise BrokerAdminError(f"no {what} from the broker within {TIMEOUT} s") from None


def _broker_pid(files: BrokerFiles) -> int:
    """The pid in the pid file, if that process is still the broker it names."""
    pid = read_pid(files.pid, program="mosquitto")
    if pid is None:
        raise BrokerNotRunningError(f"no running broker recorded in {files.pid}")
    return pid
