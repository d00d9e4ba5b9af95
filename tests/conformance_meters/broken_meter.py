"""A small meter for the conformance tests, honest except for one chosen defect.

Started by `meterproof conformance meter` with the METERPROOF_CONFORMANCE_* variables.
Honest behaviour: MQTT 5, clean start off, keepalive 30 s, receipts subscribed at QoS 1,
a reading a second at QoS 1, each kept until a receipt names its seq and reading_hash and
republished byte for byte 2 s after it was sent, reconnects backing off (paho's own
doubling), its seq and unreceipted readings kept in the state folder across restarts.
`--defect` breaks one thing, which the checks it lists in tests/test_conformance.py
must name.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import threading
import time
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from meterproof.certs.tls import client_context
from meterproof.schemas.codec import encode_reading, sign_reading
from meterproof.schemas.reading import b64url
from meterproof.schemas.signatures import load_private_key
from meterproof.schemas.signing import reading_hash, signing_bytes
from meterproof.schemas.timestamps import wall_ms

DEFECTS = (
    "wrong-bytes", "float", "wrong-alg", "seq-reuse", "no-republish", "tight-reconnect",
    "forgets-state", "retained", "qos2", "ignores-receipts",
)  # fmt: skip
REPUBLISH_AFTER_S = 2.0


def _env(name: str) -> str:
    return os.environ[f"METERPROOF_CONFORMANCE_{name}"]


def _load(state: Path) -> tuple[int, dict[int, tuple[str, bytes, float]]]:
    """(next seq, unreceipted readings) as saved before a restart, due for republishing."""
    if not state.exists():
        return 1, {}
    saved = json.loads(state.read_text())
    pending = {int(s): (h, base64.b64decode(p), 0.0) for s, (h, p) in saved["pending"].items()}
    return saved["seq"], pending


def _save(state: Path, seq: int, pending: dict[int, tuple[str, bytes, float]]) -> None:
    body = {"seq": seq, "pending": {s: [h, base64.b64encode(p).decode()]
                                    for s, (h, p, _) in pending.items()}}  # fmt: skip
    temporary = state.with_suffix(".tmp")
    temporary.write_text(json.dumps(body))
    temporary.replace(state)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--defect", choices=DEFECTS, required=True)
    defect = parser.parse_args().defect
    meter_id = _env("METER_ID")
    key = load_private_key(_env("ALG"), Path(_env("SIGNING_KEY")).read_bytes())
    tight = defect == "tight-reconnect"

    state = Path(_env("STATE_DIR")) / "broken-meter.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    remember = defect != "forgets-state"
    # seq -> (hash, payload, last sent)
    seq, pending = _load(state) if remember else (1, {})
    next_seq = [seq]  # what a save records, from the loop and from receipts
    lock = threading.Lock()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=meter_id, protocol=mqtt.MQTTv5)
    client.tls_set_context(
        client_context(
            ca_cert=Path(_env("CA_CERT")), cert=Path(_env("CERT")), key=Path(_env("KEY"))
        )
    )
    if tight:
        client.reconnect_delay_set(0.02, 0.02)  # type: ignore[arg-type]
    else:
        client.reconnect_delay_set(1, 16)

    def connected(c: mqtt.Client, *_: object) -> None:
        c.subscribe(f"meters/{meter_id}/receipts", qos=1)

    def receipt(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        if defect == "ignores-receipts":
            return
        body = json.loads(message.payload)
        with lock:
            held = pending.get(body["seq"])
            if held is not None and held[0] == body["reading_hash"]:
                del pending[body["seq"]]
                if remember:
                    _save(state, next_seq[0], pending)

    client.on_connect = connected
    client.on_message = receipt
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 0 if tight else 3600
    client.connect(
        _env("MQTT_HOST"), int(_env("MQTT_PORT")), 30, clean_start=tight, properties=properties
    )
    client.loop_start()

    topic = f"meters/{meter_id}/readings"
    energy, sent = 1000 + 7 * seq, 0
    while not stop.wait(1.0):
        energy += 7
        fields = {
            "meter_id": meter_id,
            "seq": seq,
            "ts": wall_ms(),
            "import_wh": energy,
            "export_wh": 0,
        }
        reading = sign_reading(fields, key)
        payload = encode_reading(reading)
        if defect == "wrong-bytes":  # signs the JSON text instead of the signing bytes
            sig = b64url(key.sign(orjson.dumps(fields)))
            payload = encode_reading(reading.model_copy(update={"sig": sig}))
        elif defect == "float":
            payload = payload.replace(b'"import_wh":%d' % energy, b'"import_wh":%d.0' % energy)
        elif defect == "wrong-alg":
            payload = payload.replace(b'"alg":"EdDSA"', b'"alg":"ES256"')
        digest = reading_hash(signing_bytes(reading)).hex()
        now = time.monotonic()
        with lock:
            pending[seq] = (digest, payload, now)
            due = [
                (s, p)
                for s, (_, p, sent) in pending.items()
                if now - sent >= REPUBLISH_AFTER_S and defect != "no-republish"
            ]
            for s, p in due:
                pending[s] = (pending[s][0], p, now)
            next_seq[0] = seq + 1
            if remember:  # saved before it is sent: a power cut cannot lose it
                _save(state, next_seq[0], pending)
        for _, p in [*due, (seq, payload)]:
            client.publish(topic, p, qos=2 if defect == "qos2" else 1, retain=defect == "retained")
        sent += 1
        if not (defect == "seq-reuse" and sent % 3 == 2):
            seq += 1  # seq-reuse: every third reading repeats the seq with new values
    client.disconnect()
    client.loop_stop()


if __name__ == "__main__":
    main()
