"""The demo's consent step, beside the fleet: an integrator, two owners and what it receives.

As soon as the simulated fleet's meters are registered, a household links a wallet to its
meter with both proofs (the wallet's EIP-191 signature and the meter's own), grants the
integrator live consent by signing; the operator grants it a second meter with a recorded
reason. Meanwhile the integrator, connected from the start, subscribes to everything its
certificate lets it ask for; the summary shows it received exactly those two meters.
Every step is the real command a user runs; only the wallet is a throwaway key of the
demo's (a real owner signs in their wallet app).
"""

from __future__ import annotations

import collections
import collections.abc
import itertools
import subprocess
import tempfile
import threading
import time

import paho.mqtt.client as mqtt
import psycopg
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from paho.mqtt.enums import CallbackAPIVersion

from meterproof.certs.layout import IdentityFiles, PkiLayout
from meterproof.certs.tls import client_context
from meterproof.config import StackEnv
from meterproof.meter.fleet import ID_PREFIX
from meterproof.stack.commands import command_environ, meterproof_argv

INTEGRATOR = "demo-integrator"
Say = collections.abc.Callable[[str], None]


class ConsentDemo:
    def __init__(self, env: StackEnv, say: Say) -> None:
        self._env = env
        self._say = say
        self._received: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="consent-demo", daemon=True)
        self._client: mqtt.Client | None = None
        self._files = tempfile.TemporaryDirectory(prefix="meterproof-consent-")
        self._since = time.time()
        self.consented: list[str] = []
        self.error: str | None = None

    def start(self) -> None:
        """The integrator (kept from an earlier demo on this stack), then its connection."""
        self._since = time.time()
        if INTEGRATOR not in self._cli("integrators", "list"):
            self._cli("integrators", "add", INTEGRATOR)
        self._client = self._subscribe()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
        self._files.cleanup()

    def summary(self) -> bool:
        """Say what the integrator received; True if exactly the consented meters."""
        self._thread.join(60)  # its commands are done before anything is judged
        if self.error is not None:
            self._say(f"    consent step failed: {self.error}")
            return False
        per_meter: collections.Counter[str] = collections.Counter()
        for topic, n in self._received.items():
            if topic.startswith("integrators/"):
                per_meter[topic.split("/")[3]] += n
        raw = sum(n for topic, n in self._received.items() if topic.startswith("verified/"))
        got = ", ".join(f"{n} of {m}" for m, n in sorted(per_meter.items())) or "nothing"
        self._say(f"    integrator {INTEGRATOR} received {got} on its feed; {raw} on verified/#")
        exact = set(per_meter) == set(self.consented) and raw == 0
        late = sorted(set(self.consented) - set(per_meter))
        verdict = "exactly those, nothing else" if exact else "MISMATCH"
        if late and set(per_meter) <= set(self.consented) and raw == 0:
            verdict += f" (no reading of {', '.join(late)} came after its grant: the fleet ended)"
        self._say(f"    consented: {', '.join(sorted(self.consented))}: {verdict}")
        return exact

    def _run(self) -> None:
        """The operator's grant first (one command, so the flow starts early), then the
        owner's link and grant; the fleet's readings keep coming meanwhile."""
        try:
            meters = self._fleet_meters(2)
            self._cli("consent", "grant", "--integrator", INTEGRATOR, "--meter", meters[1],
                      "--scope", "live", "--operator-reason", "demo: support case 42")  # fmt: skip
            self.consented.append(meters[1])
            owner = Account.create()
            wallet = f"eip155:1337:{owner.address}"
            self._link(meters[0], wallet, owner)
            document = self._cli("consent", "request", "--integrator", INTEGRATOR,
                                 "--meter", meters[0], "--scope", "live,history",
                                 "--signer", wallet)  # fmt: skip
            self._cli("consent", "grant", "--integrator", INTEGRATOR, "--meter", meters[0],
                      "--scope", "live,history", "--signer", wallet,
                      "--challenge", _field(document, "challenge"),
                      "--signature", self._file(_personal_sign(owner, document)))  # fmt: skip
            self.consented.append(meters[0])
            self._say(f"    consent: the operator granted {INTEGRATOR} {meters[1]}; a wallet")
            self._say(f"    {wallet[:24]}.. linked to {meters[0]} with both proofs and granted it")
        except subprocess.CalledProcessError as exc:
            self.error = f"`meterproof {exc.cmd}` exited {exc.returncode}: {exc.stderr}"
        except TimeoutError as exc:
            self.error = str(exc)

    def _link(self, meter_id: str, wallet: str, owner: LocalAccount) -> None:
        document = self._cli("meters", "link-wallet", meter_id, "--wallet", wallet)
        meter_signature = subprocess.run(
            meterproof_argv("meter", "sign-document", "--meter-id", meter_id, self._file(document)),
            env=command_environ(self._env), capture_output=True, text=True, check=True,
        )  # fmt: skip
        kid = meter_signature.stderr.strip().removeprefix("--kid ")
        self._cli("meters", "link-wallet", meter_id, "--wallet", wallet,
                  "--challenge", _field(document, "challenge"),
                  "--signature", self._file(_personal_sign(owner, document)),
                  "--kid", kid,
                  "--meter-signature", self._file(meter_signature.stdout))  # fmt: skip

    def _fleet_meters(self, count: int) -> list[str]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not self._stop.is_set():
            with psycopg.connect(self._env.database_url) as conn:
                rows = conn.execute(
                    "SELECT meter_id FROM meters WHERE meter_id LIKE %s AND status = 'active'"
                    " AND created_at >= to_timestamp(%s) ORDER BY meter_id LIMIT %s",
                    (f"{ID_PREFIX}%", self._since, count),
                ).fetchall()
            if len(rows) == count:
                return [r[0] for r in rows]
            time.sleep(0.5)
        raise TimeoutError("the fleet's meters were not registered within 60 s")

    def _subscribe(self) -> mqtt.Client:
        pki = PkiLayout(self._env.pki_root)
        return integrator_client(
            self._env,
            pki.integrator(INTEGRATOR),
            [("verified/#", 1), (f"integrators/{INTEGRATOR}/verified/#", 1)],
            on_message=lambda message: self._received.update([message.topic]),
            stopping=self._stop,
        )

    def _file(self, text: str) -> str:
        with tempfile.NamedTemporaryFile("w", dir=self._files.name, delete=False) as handle:
            handle.write(text)
        return handle.name

    def _cli(self, *args: str) -> str:
        done = subprocess.run(
            meterproof_argv(*args), env=command_environ(self._env), capture_output=True,
            text=True, check=False, timeout=60,
        )  # fmt: skip
        if done.returncode != 0:
            raise subprocess.CalledProcessError(
                done.returncode, " ".join(args[:2]), done.stdout, done.stderr.strip()[-300:]
            )
        return done.stdout


def integrator_client(
    env: StackEnv,
    files: IdentityFiles,
    subscriptions: list[tuple[str, int]],
    *,
    on_message: collections.abc.Callable[[mqtt.MQTTMessage], None],
    stopping: threading.Event,
) -> mqtt.Client:
    """An integrator's subscriber on the first broker of the stack's list that answers: a
    lost or refused connection moves the next attempt to the next broker (after the last,
    the first again), as an integrator of a `stack up --ha` stack reconnects to any. It
    subscribes again on each; once `stopping` is set, a disconnect is final."""
    pki = PkiLayout(env.pki_root)
    brokers = env.brokers()
    turn = itertools.count(1)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=files.directory.name)
    client.tls_set_context(client_context(cert=files.cert, key=files.key, ca_cert=pki.ca_cert))
    client.reconnect_delay_set(1, 5)
    client.on_message = lambda _c, _u, message: on_message(message)
    client.on_connect = lambda c, _u, _f, _rc, _p: c.subscribe(subscriptions)

    def next_broker(*_: object) -> None:
        if not stopping.is_set():
            client.connect_async(*brokers[next(turn) % len(brokers)])

    client.on_connect_fail = next_broker
    client.on_disconnect = next_broker
    client.connect_async(*brokers[0])
    client.loop_start()
    return client


def _personal_sign(owner: LocalAccount, document: str) -> str:
    return "0x" + bytes(owner.sign_message(encode_defunct(text=document)).signature).hex()


def _field(document: str, key: str) -> str:
    for line in document.splitlines():
        if line.startswith(f"{key}: "):
            return line.removeprefix(f"{key}: ")
    raise TimeoutError(f"no {key} in the document")
