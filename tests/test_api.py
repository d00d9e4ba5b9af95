"""The HTTP API against a real server process (tests/fixtures/api.py) on the session's
PostgreSQL, Redis and PKI: tokens, consented reads, submissions through the pipeline, wallet
links, and bad input answered with a problem body and a stable code."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import ssl
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import psycopg
import pytest
from bridge_harness import Clock, in_process
from eth_account import Account
from eth_account.messages import encode_defunct
from fixtures.api import OPERATOR_SECRET, ApiServer, signed
from ingest_harness import provision
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from waiting import wait_until
from websocket_harness import websocket
from websockets.exceptions import ConnectionClosed

from meterproof.bridge.oracle import load_oracle
from meterproof.bridge.proof import check_proof
from meterproof.certs import crl as certs_crl
from meterproof.certs.bootstrap import init_pki
from meterproof.certs.identities import issue_device
from meterproof.certs.layout import PkiLayout
from meterproof.certs.tls import client_context
from meterproof.consent import repository as consent
from meterproof.consent.model import Scope
from meterproof.registry import repository
from meterproof.registry.model import MeterStatus
from meterproof.schemas.reading import b64url
from meterproof.schemas.signatures import PrivateKey
from meterproof.schemas.timestamps import wall_ms


def _problem(answer: Any, status: int, code: str) -> dict[str, Any]:
    """The answer is the one error body: RFC 9457 with our code and a correlation id."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = answer.json()
    assert body["code"] == code, body
    assert body["status"] == status
    assert body["correlation_id"] == answer.headers["x-correlation-id"]
    return body


def _integrator(api: ApiServer, name: str) -> str:
    with psycopg.connect(api.database_url, autocommit=True) as conn:
        return consent.add_integrator(conn, name, cert_serial="0a1b")


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_client_credentials_issue_scoped_short_lived_tokens(
    api_server: ApiServer, make_meter_id: Callable[[], str]
) -> None:
    meter_id = make_meter_id()
    provision(api_server.pki, api_server.database_url, meter_id)
    form = {"grant_type": "client_credentials", "client_id": "operator"}
    with api_server.client() as http:
        _problem(http.post("/api/auth/token", data={**form, "client_secret": "no"}), 401,
                 "invalid_client")  # fmt: skip
        _problem(http.post("/api/auth/token", data={**form, "grant_type": "password"}), 400,
                 "unsupported_grant_type")  # fmt: skip
        _problem(http.post("/api/auth/token", json=form), 415, "unsupported_media_type")
        narrow = api_server.token("operator", "operator-secret-for-tests-only", "readings:read")
        _problem(http.get(f"/api/meters/{meter_id}", headers=_bearer(narrow)), 403,
                 "insufficient_scope")  # fmt: skip
        full = api_server.operator_token()
        record = http.get(f"/api/meters/{meter_id}", headers=_bearer(full))
        assert record.status_code == 200, record.text
        assert record.json()["meter_id"] == meter_id
        _problem(http.get(f"/api/meters/{meter_id}", headers=_bearer(full[:-2])), 401,
                 "invalid_token")  # fmt: skip
        claims = jwt.decode(full, options={"verify_signature": False})
        assert 0 < claims["exp"] - claims["iat"] <= 300
        key = (api_server.log.parent / "token.key").read_text().strip().encode()
        expired = jwt.encode({**claims, "exp": int(time.time()) - 1}, key, algorithm="HS256")
        _problem(http.get(f"/api/meters/{meter_id}", headers=_bearer(expired)), 401,
                 "token_expired")  # fmt: skip
        _problem(http.get(f"/api/meters/{meter_id}"), 401, "unauthenticated")

        secret = _integrator(api_server, f"acme-{meter_id[-12:]}")
        wide = {**form, "client_id": f"acme-{meter_id[-12:]}", "client_secret": secret}
        _problem(http.post("/api/auth/token", data={**wide, "scope": "meters:read"}), 400,
                 "invalid_scope")  # fmt: skip
        integrator = api_server.token(wide["client_id"], secret)
        _problem(http.get(f"/api/meters/{meter_id}", headers=_bearer(integrator)), 403,
                 "wrong_client")  # fmt: skip


def test_integrator_reads_pass_the_consent_policy(
    api_server: ApiServer, make_meter_id: Callable[[], str]
) -> None:
    meter_id = make_meter_id()
    key = provision(api_server.pki, api_server.database_url, meter_id)
    t0 = wall_ms() - 60_000
    with api_server.meter_client(meter_id) as meter:
        for seq in range(1, 4):
            answer = meter.post(
                f"/api/meters/{meter_id}/energy", content=signed(meter_id, key, seq, t0 + seq)
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["status"] == "accepted"
    name = f"acme-{meter_id[-12:]}"
    token = api_server.token(name, _integrator(api_server, name))
    with api_server.client(headers=_bearer(token)) as http:
        wait_until(
            lambda: (
                http.get(f"/api/meters/{meter_id}/latest").json()["code"] != "unknown_integrator"
            ),
            what="the new integrator reaches the API's consent view",
        )
        _problem(http.get(f"/api/meters/{meter_id}/latest"), 403, "no_consent")
        _problem(http.get(f"/api/meters/{meter_id}/history"), 403, "no_consent")
        with psycopg.connect(api_server.database_url, autocommit=True) as conn:
            consent.grant(
                conn,
                consent.GrantRequest(
                    integrator=name, meter_id=meter_id, account=None,
                    scopes=frozenset({Scope.HISTORY}),
                    data_from=datetime.fromtimestamp((t0 + 2) / 1000, UTC),
                    data_to=None, expires_at=None,
                ),
                operator_reason="test",
            )  # fmt: skip
        latest = wait_until(
            lambda: (a := http.get(f"/api/meters/{meter_id}/latest")).status_code == 200 and a,
            what="the grant reaches the API's consent view",
        )
        assert latest.json()["seq"] == 3
        page = http.get(f"/api/meters/{meter_id}/history", params={"limit": 2})
        assert [r["seq"] for r in page.json()["readings"]] == [2], "seq 1 predates the consent"
        rest = http.get(
            f"/api/meters/{meter_id}/history", params={"cursor": page.json()["next_cursor"]}
        )
        assert [r["seq"] for r in rest.json()["readings"]] == [3]
        assert rest.json()["next_cursor"] is None
        table = http.get(f"/api/meters/{meter_id}/history", params={"format": "csv"})
        assert table.headers["content-type"].startswith("text/csv")
        assert [r["seq"] for r in csv.DictReader(io.StringIO(table.text))] == ["2", "3"]
        _problem(http.get(f"/api/meters/{meter_id}/history", params={"cursor": "??"}), 400,
                 "invalid_cursor")  # fmt: skip
        with psycopg.connect(api_server.database_url, autocommit=True) as conn:
            consent.revoke_integrator(conn, name, reason="test")
        wait_until(
            lambda: http.get(f"/api/meters/{meter_id}/latest").status_code == 403,
            what="the revocation reaches the API's consent view",
        )
        _problem(http.get(f"/api/meters/{meter_id}/latest"), 403, "integrator_revoked")


def test_submissions_answer_after_the_commit_with_the_mqtt_receipt(
    api_server: ApiServer, make_meter_id: Callable[[], str]
) -> None:
    meter_id, other = make_meter_id(), make_meter_id()
    key = provision(api_server.pki, api_server.database_url, meter_id)
    provision(api_server.pki, api_server.database_url, other)
    now = wall_ms()
    good = signed(meter_id, key, 1, now)
    tampered = good.replace(b'"import_wh":0', b'"import_wh":7')
    with api_server.meter_client(meter_id) as meter:
        first = meter.post(f"/api/meters/{meter_id}/energy", content=good)
        assert first.status_code == 200, first.text
        receipt = first.json()
        assert (receipt["status"], receipt["seq"]) == ("accepted", 1)
        with psycopg.connect(api_server.database_url) as conn:
            stored = conn.execute(
                "SELECT encode(reading_hash, 'hex') FROM reading_log WHERE meter_id = %s",
                (meter_id,),
            ).fetchall()
        assert stored == [(receipt["reading_hash"],)], "stored before the answer"
        refused = _problem(
            meter.post(f"/api/meters/{meter_id}/energy", content=tampered), 422, "bad_signature"
        )
        assert refused["receipt"]["status"] == "rejected"
        _problem(meter.post(f"/api/meters/{meter_id}/energy", content=b"{"), 422, "malformed")
        _problem(meter.post(f"/api/meters/{other}/energy", content=good), 403, "not_this_meter")
        batch = meter.post(
            "/api/meters/energy/batch",
            json={"readings": [good.decode(), signed(meter_id, key, 2, now + 1).decode(),
                               tampered.decode()]},
        )  # fmt: skip
        assert batch.status_code == 200, batch.text
        assert [(r["status"], r["reason"]) for r in batch.json()["receipts"]] == [
            ("duplicate", None), ("accepted", None), ("rejected", "bad_signature"),
        ]  # fmt: skip
    with api_server.client(headers=_bearer(api_server.operator_token())) as http:
        assert http.get(f"/api/meters/{meter_id}/latest").json()["seq"] == 2
    with api_server.client() as anonymous:
        _problem(anonymous.post(f"/api/meters/{meter_id}/energy", content=good), 401,
                 "unauthenticated")  # fmt: skip


def test_bad_input_gets_a_4xx_with_a_stable_code(
    api_server: ApiServer, make_meter_id: Callable[[], str]
) -> None:
    meter_id = make_meter_id()
    provision(api_server.pki, api_server.database_url, meter_id)
    with api_server.client(headers=_bearer(api_server.operator_token())) as http:
        _problem(http.get("/api/meters/bad%20id/latest"), 422, "invalid_request")
        _problem(http.get(f"/api/meters/{meter_id}x"), 404, "unknown_meter")
        _problem(http.get(f"/api/meters/{meter_id}/latest"), 404, "no_readings")
        _problem(http.get(f"/api/meters/{meter_id}/history", params={"limit": "many"}), 422,
                 "invalid_request")  # fmt: skip
        _problem(http.get("/api/wallets/not-an-account/meters"), 422, "invalid_input")
        _problem(http.post(f"/api/meters/{meter_id}/link-wallet", content=b"{]"), 422,
                 "invalid_request")  # fmt: skip
        _problem(http.post("/api/auth/token", content=b"x" * (2 << 20)), 413, "too_large")
        _problem(http.get("/nowhere"), 404, "not_found")
        given = http.get("/nowhere", headers={"X-Correlation-ID": "trace-12345678"})
        assert given.headers["x-correlation-id"] == "trace-12345678"
    with api_server.meter_client(meter_id) as meter:
        _problem(meter.post("/api/meters/energy/batch", json={"readings": []}), 422,
                 "invalid_request")  # fmt: skip


def test_a_meter_and_its_wallet_link_by_proving_both_keys(
    api_server: ApiServer, make_meter_id: Callable[[], str]
) -> None:
    meter_id = make_meter_id()
    meter_key = provision(api_server.pki, api_server.database_url, meter_id)
    with psycopg.connect(api_server.database_url) as conn:
        row = conn.execute(
            "SELECT k.kid FROM meter_keys k JOIN meters m ON m.id = k.meter WHERE m.meter_id = %s",
            (meter_id,),
        ).fetchone()
    assert row is not None
    wallet = Account.create()
    account = f"eip155:1337:{wallet.address}"

    def wallet_sign(document: str) -> str:
        return "0x" + wallet.sign_message(encode_defunct(text=document)).signature.hex()

    with api_server.meter_client(meter_id) as meter:
        challenge = meter.post(f"/api/meters/{meter_id}/link-wallet", json={"account": account})
        assert challenge.status_code == 200, challenge.text
        document = challenge.json()["document"]
        assert document.startswith("meterproof link-wallet v1")
        proof = {
            "account": account,
            "challenge_id": challenge.json()["challenge_id"],
            "wallet_signature": wallet_sign(document),
            "meter_kid": row[0],
            "meter_signature": b64url(meter_key.sign(document.encode())),
        }
        forged = meter.post(
            f"/api/meters/{meter_id}/verify-ownership",
            json={**proof, "wallet_signature": wallet_sign(document + "x")},
        )
        assert (forged.status_code, forged.json()["code"]) == (403, "bad_wallet_signature")
        again = meter.post(f"/api/meters/{meter_id}/link-wallet", json={"account": account})
        proof["challenge_id"] = again.json()["challenge_id"]
        proof["wallet_signature"] = wallet_sign(again.json()["document"])
        proof["meter_signature"] = b64url(meter_key.sign(again.json()["document"].encode()))
        linked = meter.post(f"/api/meters/{meter_id}/verify-ownership", json=proof)
        assert linked.status_code == 200, linked.text
        assert linked.json()["account"] == account
        replayed = meter.post(f"/api/meters/{meter_id}/verify-ownership", json=proof)
        assert (replayed.status_code, replayed.json()["code"]) == (403, "challenge_used")
    headers = {"Authorization": f"Bearer {api_server.operator_token()}"}
    with api_server.client(headers=headers) as http:
        owned = http.get(f"/api/wallets/{account}/meters")
        assert owned.status_code == 200, owned.text
        assert owned.json()["meters"] == [meter_id]


def test_the_curl_lines_of_docs_api_md_work(
    api_server: ApiServer, make_meter_id: Callable[[], str], tmp_path: Path
) -> None:
    """The Examples block, run by bash as written (its `export` lines aside: they name
    the checkout's stack), with the readings it submits in its working directory."""
    meter_id = make_meter_id()
    key = provision(api_server.pki, api_server.database_url, meter_id)
    now = wall_ms()
    (tmp_path / "reading.json").write_bytes(signed(meter_id, key, 1, now))
    batch = [signed(meter_id, key, seq, now + seq).decode() for seq in (2, 3)]
    (tmp_path / "batch.json").write_text(json.dumps({"readings": batch}))
    doc = (Path(__file__).parent.parent / "docs" / "api.md").read_text()
    block = re.search(r"## Examples.*?```sh\n(.*?)```", doc, re.S)
    assert block is not None
    script = "\n".join(line for line in block[1].splitlines() if not line.startswith("export "))
    env = {
        **os.environ, "API": api_server.url, "CA": str(api_server.pki.ca_cert),
        "METER": meter_id, "DEV": str(api_server.pki.device(meter_id).directory),
        "METERPROOF_API_OPERATOR_SECRET": OPERATOR_SECRET,
    }  # fmt: skip
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"status":"accepted"' in done.stdout
    assert _latest(api_server, meter_id)["seq"] == 3
    lines = done.stdout.count(meter_id + ",")
    assert lines == 3, "the CSV history lists the three readings"


def _latest(api: ApiServer, meter_id: str) -> dict[str, Any]:
    with api.client(headers=_bearer(api.operator_token())) as http:
        body: dict[str, Any] = http.get(f"/api/meters/{meter_id}/latest").json()
        return body


def test_requests_are_counted_per_route_and_status(api_server: ApiServer) -> None:
    with api_server.client() as http:
        http.get("/health")
        http.get("/api/meters/some-meter/latest")
        metrics = httpx.get(api_server.metrics_url).text
    assert re.search(
        r'meterproof_api_requests_total\{method="GET",route="/health",status="200"\} [1-9]', metrics
    )
    assert re.search(
        r'meterproof_api_requests_total\{method="GET",route="/api/meters/\{meter_id\}/latest",'
        r'status="401"\} [1-9]',
        metrics,
    )
    assert re.search(r'meterproof_api_refusals_total\{code="unauthenticated"\} [1-9]', metrics)
    assert httpx.get(api_server.metrics_url.replace("/metrics", "/readyz")).status_code == 200


def test_ledger_reads_public_entries_and_consented_proofs(
    api_server: ApiServer, make_meter_id: Callable[[], str]
) -> None:
    meter_id = make_meter_id()
    key = provision(api_server.pki, api_server.database_url, meter_id)
    now = wall_ms()
    with api_server.meter_client(meter_id) as meter:
        receipt = meter.post(
            f"/api/meters/{meter_id}/energy", content=signed(meter_id, key, 1, now, imp=5)
        ).json()
    proof_path = f"/api/ledger/proofs/{receipt['reading_hash']}"
    operator = _bearer(api_server.operator_token())
    with api_server.client() as http:
        _problem(http.get(proof_path, headers=operator), 404, "not_anchored")
        _problem(http.get(proof_path), 401, "unauthenticated")
        runner = in_process(api_server.database_url, load_oracle(api_server.pki.oracle_key),
                            Clock(now + 10_000))  # fmt: skip
        runner.run_once()
        runner.close()
        proof = http.get(proof_path, headers=operator)
        assert proof.status_code == 200, proof.text
        oracle_key = load_oracle(api_server.pki.oracle_key).public_key
        assert check_proof(proof.json(), trusted_key=oracle_key).tree_size >= 1
        entries = http.get("/api/ledger/entries")  # no credentials: public
        assert entries.status_code == 200, entries.text
        hashes = [e["entry_hash"] for e in entries.json()["entries"]]
        assert proof.json()["entry"]["entry_hash"] in hashes
        assert http.get("/api/ledger/balances").status_code == 200
        name = f"acme-{meter_id[-12:]}"
        token = _bearer(api_server.token(name, _integrator(api_server, name)))
        wait_until(
            lambda: http.get(proof_path, headers=token).json()["code"] != "unknown_integrator",
            what="the new integrator reaches the API's consent view",
        )
        _problem(http.get(proof_path, headers=token), 403, "no_consent")


def test_rollups_come_from_register_differences_per_interval(
    api_server: ApiServer, make_meter_id: Callable[[], str]
) -> None:
    meter_id = make_meter_id()
    key = provision(api_server.pki, api_server.database_url, meter_id)
    quarter = 900_000
    base = wall_ms() // quarter * quarter - 3 * quarter
    readings = [(1, base + 1000, 100), (2, base + 2000, 150), (3, base + quarter + 1000, 400)]
    with api_server.meter_client(meter_id) as meter:
        for seq, ts, imp in readings:
            answer = meter.post(
                f"/api/meters/{meter_id}/energy", content=signed(meter_id, key, seq, ts, imp)
            )
            assert answer.status_code == 200, answer.text
        window = {"from": base, "to": base + 2 * quarter}
        found = meter.get(f"/api/meters/{meter_id}/rollups", params=window)
        assert found.status_code == 200, found.text
        rows = [(r["start_ms"], r["import_wh"], r["readings"]) for r in found.json()["rollups"]]
        assert rows == [(base, 50, 2), (base + quarter, 250, 1)]
        hours = {"from": base // 3_600_000 * 3_600_000, "to": window["to"], "width": "1h"}
        hourly = meter.get(f"/api/meters/{meter_id}/rollups", params=hours)
        assert sum(r["import_wh"] for r in hourly.json()["rollups"]) == 300
        _problem(meter.get(f"/api/meters/{meter_id}/rollups", params={"from": 5, "to": 5}), 422,
                 "invalid_period")  # fmt: skip


def test_operators_quarantine_and_decommission_and_the_pipeline_follows(
    api_server: ApiServer, make_meter_id: Callable[[], str]
) -> None:
    meter_id = make_meter_id()
    key = provision(api_server.pki, api_server.database_url, meter_id)
    now = wall_ms()
    reason = {"reason": "tamper alarm"}
    with api_server.client(headers=_bearer(api_server.operator_token())) as http:
        held = http.post(f"/api/meters/{meter_id}/quarantine", json=reason)
        assert held.json() == {
            "meter_id": meter_id, "previous": "active", "status": "quarantined", "changed": True,
        }  # fmt: skip
        with api_server.meter_client(meter_id) as meter:
            refused = wait_until(
                lambda: (a := meter.post(f"/api/meters/{meter_id}/energy",
                                         content=signed(meter_id, key, 1, now))).status_code
                == 422 and a,
                what="the quarantine reaches the pipeline's key cache",
            )  # fmt: skip
            assert refused.json()["code"] == "meter_not_active"
            status = meter.get(f"/api/meters/{meter_id}/security/status").json()
        assert status["status"] == "quarantined"
        changes = [e["detail"] for e in status["events"] if e["type"] == "status_changed"]
        assert changes[0] == {"from": "active", "to": "quarantined", "reason": "tamper alarm"}
        assert http.post(f"/api/meters/{meter_id}/decommission", json=reason).json()["changed"]
        _problem(http.post(f"/api/meters/{meter_id}/quarantine", json=reason), 409,
                 "meter_decommissioned")  # fmt: skip
        _problem(http.post("/api/meters/nobody-here/quarantine", json=reason), 404, "not_found")
    readings = api_server.token("operator", OPERATOR_SECRET, "readings:read")
    with api_server.client(headers=_bearer(readings)) as http:
        _problem(http.post(f"/api/meters/{meter_id}/quarantine", json=reason), 403,
                 "insufficient_scope")  # fmt: skip


def test_a_registered_meter_is_activated_by_proving_its_key(
    api_server: ApiServer, make_meter_id: Callable[[], str]
) -> None:
    meter_id = make_meter_id()
    key = provision(api_server.pki, None, meter_id)  # certificate and key, not registered
    pem = api_server.pki.device(meter_id).signing_pub.read_text()
    body = {"meter_id": meter_id, "alg": "EdDSA", "public_key_pem": pem, "serial": "SN-1"}
    with api_server.client(headers=_bearer(api_server.operator_token())) as http:
        made = http.post("/api/meters", json=body)
        assert made.status_code == 201, made.text
        assert made.json()["meter"]["status"] == "pending_registration"
        registration = made.json()["registration_token"]
        _problem(http.post("/api/meters", json=body), 409, "conflict")
    with api_server.meter_client(meter_id) as meter:
        _problem(meter.post(f"/api/meters/{meter_id}/energy", content=signed(meter_id, key, 1,
                 wall_ms())), 422, "meter_not_active")  # fmt: skip
        challenge = meter.get(f"/api/meters/{meter_id}/auth/challenge").json()["challenge"]
        with psycopg.connect(api_server.database_url) as conn:
            row = conn.execute(
                "SELECT k.kid FROM meter_keys k JOIN meters m ON m.id = k.meter"
                " WHERE m.meter_id = %s", (meter_id,),
            ).fetchone()  # fmt: skip
        assert row is not None
        proof = {"challenge": challenge, "kid": row[0],
                 "signature": b64url(key.sign(challenge.encode()))}  # fmt: skip
        path = f"/api/meters/{meter_id}/auth/challenge"
        _problem(meter.post(path, json=proof), 403, "registration_token_required")
        forged = {
            **proof,
            "signature": b64url(key.sign(b"other")),
            "registration_token": registration,
        }
        _problem(meter.post(path, json=forged), 403, "bad_meter_signature")
        _problem(meter.post(path, json={**proof, "registration_token": "x.y.z"}), 401,
                 "invalid_registration")  # fmt: skip
        proven = meter.post(path, json={**proof, "registration_token": registration})
        assert proven.json() == {"meter_id": meter_id, "status": "active", "accepts_readings": True}
        assert meter.get(f"/api/meters/{meter_id}/auth/status").json()["status"] == "active"
        accepted = wait_until(
            lambda: (a := meter.post(f"/api/meters/{meter_id}/energy",
                                     content=signed(meter_id, key, 1, wall_ms()))).status_code
            == 200 and a,
            what="the activation reaches the pipeline's key cache",
        )  # fmt: skip
        assert accepted.json()["status"] == "accepted"


def test_a_live_stream_follows_the_consent_and_closes_on_revocation(
    api_server: ApiServer, make_meter_id: Callable[[], str]
) -> None:
    meter_id = make_meter_id()
    key = provision(api_server.pki, api_server.database_url, meter_id)
    allowed, refused = f"live-{meter_id[-12:]}", f"none-{meter_id[-12:]}"
    tokens = {n: api_server.token(n, _integrator(api_server, n)) for n in (allowed, refused)}
    with psycopg.connect(api_server.database_url, autocommit=True) as conn:
        grant = consent.grant(
            conn,
            consent.GrantRequest(
                integrator=allowed, meter_id=meter_id, account=None,
                scopes=frozenset({Scope.LIVE}), data_from=datetime(2020, 1, 1, tzinfo=UTC),
                data_to=None, expires_at=None,
            ),
            operator_reason="test",
        )  # fmt: skip
    with api_server.client() as http:
        for name, code in ((allowed, "scope"), (refused, "no_consent")):
            wait_until(
                lambda name=name, code=code: http.get(
                    f"/api/meters/{meter_id}/latest", headers=_bearer(tokens[name])
                ).json()["code"] == code,
                what="the API's consent view knows both integrators",
            )  # fmt: skip
    uri = api_server.url.replace("https://", "wss://") + f"/api/meters/{meter_id}/stream/energy"
    tls = ssl.create_default_context(cafile=str(api_server.pki.ca_cert))
    with (
        websocket(uri, tls=tls, headers=_bearer(tokens[refused])) as nobody,
        pytest.raises(ConnectionClosed) as closed,
    ):
        nobody.recv(timeout=5)
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4403, "no_consent")
    with websocket(uri, tls=tls, headers=_bearer(tokens[allowed])) as stream:
        with api_server.meter_client(meter_id) as meter:
            sent = meter.post(f"/api/meters/{meter_id}/energy", content=signed(meter_id, key, 1,
                              wall_ms()))  # fmt: skip
        live = json.loads(stream.recv(timeout=5))
        assert (live["seq"], live["reading_hash"]) == (1, sent.json()["reading_hash"])
        with psycopg.connect(api_server.database_url, autocommit=True) as conn:
            consent.revoke(conn, grant.id, operator_reason="test")
        revoked_at = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            stream.recv(timeout=5)
        took = time.monotonic() - revoked_at
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4403, "no_consent")
    assert took < 1.0, f"disconnected {took:.2f} s after the revocation's commit"


def test_status_and_alert_streams_follow_the_registry(
    api_server: ApiServer, make_meter_id: Callable[[], str]
) -> None:
    meter_id = make_meter_id()
    provision(api_server.pki, api_server.database_url, meter_id)
    files = api_server.pki.device(meter_id)
    tls = client_context(cert=files.cert, key=files.key, ca_cert=api_server.pki.ca_cert)
    base = api_server.url.replace("https://", "wss://") + f"/api/meters/{meter_id}/stream"
    with (
        websocket(f"{base}/status", tls=tls) as status,
        websocket(f"{base}/alerts", tls=tls) as alerts,
    ):
        assert json.loads(status.recv(timeout=5))["status"] == "active"
        with api_server.client(headers=_bearer(api_server.operator_token())) as http:
            http.post(f"/api/meters/{meter_id}/quarantine", json={"reason": "tamper alarm"})
        assert json.loads(status.recv(timeout=5))["status"] == "quarantined"
        alert = json.loads(alerts.recv(timeout=5))
        assert (alert["type"], alert["detail"]["reason"]) == ("status_changed", "tamper alarm")
    other = make_meter_id()
    provision(api_server.pki, None, other)
    with (
        websocket(base.replace(meter_id, other) + "/alerts", tls=tls) as foreign,
        pytest.raises(ConnectionClosed) as closed,
    ):
        foreign.recv(timeout=5)
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4403, "not_this_meter")


def test_a_stream_closes_when_its_token_expires(
    api_server: ApiServer, make_meter_id: Callable[[], str]
) -> None:
    meter_id = make_meter_id()
    provision(api_server.pki, api_server.database_url, meter_id)
    base = api_server.url.replace("https://", "wss://") + f"/api/meters/{meter_id}/stream"
    claims = jwt.decode(api_server.operator_token(), options={"verify_signature": False})
    key = (api_server.log.parent / "token.key").read_text().strip().encode()
    expires = int(time.time()) + 3
    short = jwt.encode({**claims, "exp": expires}, key, algorithm="HS256")
    tls = ssl.create_default_context(cafile=str(api_server.pki.ca_cert))
    with websocket(f"{base}/status", tls=tls, headers=_bearer(short)) as stream:
        assert json.loads(stream.recv(timeout=5))["status"] == "active"
        with pytest.raises(ConnectionClosed) as closed:
            stream.recv(timeout=10)
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4401, "token_expired")
    assert time.time() >= expires  # closed by the expiry, within recv's 10 s


def test_a_meters_stream_closes_when_its_certificate_is_revoked(
    api_server: ApiServer, make_meter_id: Callable[[], str]
) -> None:
    meter_id = make_meter_id()
    provision(api_server.pki, api_server.database_url, meter_id)
    base = api_server.url.replace("https://", "wss://") + f"/api/meters/{meter_id}/stream"
    files = api_server.pki.device(meter_id)
    own = client_context(cert=files.cert, key=files.key, ca_cert=api_server.pki.ca_cert)
    with websocket(f"{base}/alerts", tls=own) as alerts:
        with pytest.raises(TimeoutError):
            alerts.recv(timeout=0.5)  # open, nothing to say
        certs_crl.revoke(api_server.pki, meter_id)
        with pytest.raises(ConnectionClosed) as closed:
            alerts.recv(timeout=5)
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4401, "certificate_revoked")


def test_an_integrator_sees_only_rollup_intervals_its_consent_covers_whole(
    api_server: ApiServer, make_meter_id: Callable[[], str]
) -> None:
    meter_id = make_meter_id()
    key = provision(api_server.pki, api_server.database_url, meter_id)
    hour = 3_600_000
    day = wall_ms() // (24 * hour) * (24 * hour) - 24 * hour  # yesterday, 00:00 UTC
    times = [8 * hour, 9 * hour, 10 * hour + hour // 2, 13 * hour, 15 * hour]
    with api_server.meter_client(meter_id) as meter:
        for seq, at in enumerate(times, start=1):
            sent = meter.post(f"/api/meters/{meter_id}/energy",
                              content=signed(meter_id, key, seq, day + at, 100 * seq))  # fmt: skip
            assert sent.json()["status"] == "accepted", sent.text
    name = f"noon-{meter_id[-12:]}"
    token = _bearer(api_server.token(name, _integrator(api_server, name)))
    with psycopg.connect(api_server.database_url, autocommit=True) as conn:
        consent.grant(
            conn,
            consent.GrantRequest(
                integrator=name, meter_id=meter_id, account=None,
                scopes=frozenset({Scope.HISTORY}),
                data_from=datetime.fromtimestamp(day / 1000, UTC),
                data_to=datetime.fromtimestamp((day + 12 * hour) / 1000, UTC),
                expires_at=None,
            ),
            operator_reason="test",
        )  # fmt: skip
    path = f"/api/meters/{meter_id}/rollups"
    whole_day = {"from": day, "to": day + 24 * hour}
    with api_server.client() as http:
        hours = wait_until(
            lambda: (a := http.get(path, params={**whole_day, "width": "1h"}, headers=token))
            .status_code == 200 and a,
            what="the API's consent view has the grant",
        )  # fmt: skip
        days = http.get(path, params={**whole_day, "width": "1d"}, headers=token)
    with api_server.client(headers=_bearer(api_server.operator_token())) as http:
        everything = http.get(path, params={**whole_day, "width": "1d"}).json()["rollups"]
    assert [r["readings"] for r in everything] == [5], "the operator sees the whole day"
    assert days.status_code == 200, days.text
    assert days.json()["rollups"] == [], "the day runs past the consent's noon: hidden"
    shown = [(r["start_ms"] - day, r["readings"]) for r in hours.json()["rollups"]]
    assert shown == [(8 * hour, 1), (9 * hour, 1), (10 * hour, 1)], "the morning's hours"


def test_an_out_of_range_cursor_is_invalid_not_unavailable(
    api_server: ApiServer, make_meter_id: Callable[[], str]
) -> None:
    meter_id = make_meter_id()
    provision(api_server.pki, api_server.database_url, meter_id)
    with api_server.client(headers=_bearer(api_server.operator_token())) as http:
        for position in ("99999999999999999999:1", "1:99999999999999999999999", "-5:1",
                         "253402300800000:0", "1:2:3", "x:1"):  # fmt: skip
            cursor = base64.urlsafe_b64encode(position.encode()).decode()
            answer = http.get(f"/api/meters/{meter_id}/history", params={"cursor": cursor})
            _problem(answer, 400, "invalid_cursor")


def test_a_key_proof_whose_pooled_connections_were_cut_is_read_again(
    api_server: ApiServer, make_meter_id: Callable[[], str]
) -> None:
    """The API's pooled connections are cut (as a database restart or a failover would):
    the key proof's read takes a closed one, is tried again on another, and answers."""
    meter_id = make_meter_id()
    key = provision(api_server.pki, api_server.database_url, meter_id)
    again = api_server.sample("meterproof_api_reads_again_total")
    with api_server.meter_client(meter_id) as meter:
        for _ in range(3):
            proof = _key_proof(meter, meter_id, api_server.database_url, key)
            _cut_connections(api_server.database_url)
            answer = meter.post(f"/api/meters/{meter_id}/auth/challenge", json=proof)
            assert answer.status_code == 200, answer.text
    assert api_server.sample("meterproof_api_reads_again_total") > again


def test_a_database_failure_under_a_key_proof_answers_unavailable(
    api_server: ApiServer, make_meter_id: Callable[[], str]
) -> None:
    """The API's pooled connections are cut and the database takes no new ones: the key
    proof's read answers 503 `unavailable` (within the second a read tried again waits),
    never a bare 500; once the database takes connections again, it answers."""
    meter_id = make_meter_id()
    key = provision(api_server.pki, api_server.database_url, meter_id)
    admin = make_conninfo(api_server.database_url, dbname="postgres")
    name = conninfo_to_dict(api_server.database_url)["dbname"]
    path = f"/api/meters/{meter_id}/auth/challenge"
    with api_server.meter_client(meter_id) as meter:
        proof = _key_proof(meter, meter_id, api_server.database_url, key)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(
                sql.Identifier(str(name))))  # fmt: skip
            try:
                _cut_connections(admin, database=str(name))
                answer = meter.post(path, json=proof)
            finally:
                conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(
                    sql.Identifier(str(name))))  # fmt: skip
        _problem(answer, 503, "unavailable")
        proof = _key_proof(meter, meter_id, api_server.database_url, key)
        answer = wait_until(
            lambda: (a := meter.post(path, json=proof)).status_code == 200 and a,
            what="the pool reconnects",
        )  # fmt: skip
    assert answer.json()["status"] == "active"


def _key_proof(
    meter: httpx.Client, meter_id: str, database_url: str, key: PrivateKey
) -> dict[str, str]:
    """A fresh challenge of `meter_id`, signed with its registered key `key`."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT k.kid FROM meter_keys k JOIN meters m ON m.id = k.meter"
            " WHERE m.meter_id = %s", (meter_id,),
        ).fetchone()  # fmt: skip
    assert row is not None
    challenge = meter.get(f"/api/meters/{meter_id}/auth/challenge").json()["challenge"]
    return {
        "challenge": challenge,
        "kid": row[0],
        "signature": b64url(key.sign(challenge.encode())),
    }


def _cut_connections(database_url: str, *, database: str | None = None) -> None:
    """End every other session on `database` (default: the URL's): the API's pools, its
    worker's, its views'."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = coalesce(%s, current_database()) AND pid <> pg_backend_pid()",
            (database,),
        )


def test_a_key_proof_never_overwrites_a_status_set_since_it_was_read(
    api_server: ApiServer, make_meter_id: Callable[[], str]
) -> None:
    """prove_key activates only from pending_registration, decided under the row's lock:
    a quarantine between its read and its write stands (the meter is told it is
    quarantined, as if the quarantine had come first), and nothing is written."""
    meter_id = make_meter_id()
    provision(api_server.pki, api_server.database_url, meter_id,
              status=MeterStatus.PENDING_REGISTRATION)  # fmt: skip
    with psycopg.connect(api_server.database_url, autocommit=True) as conn:
        repository.set_status(conn, meter_id, MeterStatus.QUARANTINED, reason="tamper alarm")
        events = len(repository.recent_events(conn, meter_id, limit=100))
        change = repository.set_status(
            conn, meter_id, MeterStatus.ACTIVE, reason="proved its key",
            only_from=MeterStatus.PENDING_REGISTRATION,
        )  # fmt: skip
        assert (change.old, change.new, change.changed) == (
            MeterStatus.QUARANTINED, MeterStatus.QUARANTINED, False,
        )  # fmt: skip
        record = repository.fetch_meter(conn, meter_id)
        assert record is not None
        assert record.status is MeterStatus.QUARANTINED
        assert len(repository.recent_events(conn, meter_id, limit=100)) == events
        other = make_meter_id()
        provision(api_server.pki, api_server.database_url, other,
                  status=MeterStatus.PENDING_REGISTRATION)  # fmt: skip
        activated = repository.set_status(
            conn, other, MeterStatus.ACTIVE, reason="proved its key",
            only_from=MeterStatus.PENDING_REGISTRATION,
        )  # fmt: skip
        assert (activated.old, activated.new) == (
            MeterStatus.PENDING_REGISTRATION, MeterStatus.ACTIVE,
        )  # fmt: skip


def test_foreign_expired_and_revoked_certificates_are_refused(
    api_server: ApiServer, make_meter_id: Callable[[], str], tmp_path: Path
) -> None:
    meter_id, old = make_meter_id(), make_meter_id()
    key = provision(api_server.pki, api_server.database_url, meter_id)
    reading = signed(meter_id, key, 1, wall_ms())
    rogue = PkiLayout(tmp_path / "rogue")
    init_pki(rogue, ca_key="ec-p384")
    foreign = issue_device(rogue, meter_id)  # the same CN and issuer name, another CA key
    now = datetime.now(UTC)
    expired = issue_device(api_server.pki, old, not_before=now - timedelta(days=9), not_after=now)
    for files in (foreign, expired):
        tls = client_context(cert=files.cert, key=files.key, ca_cert=api_server.pki.ca_cert)
        with httpx.Client(base_url=api_server.url, verify=tls) as http, pytest.raises(
            httpx.TransportError
        ):  # fmt: skip
            http.post(f"/api/meters/{meter_id}/energy", content=reading)
    with api_server.meter_client(meter_id) as meter:
        assert meter.get(f"/api/meters/{meter_id}/auth/status").status_code == 200
    certs_crl.revoke(api_server.pki, meter_id)
    with api_server.meter_client(meter_id) as meter:
        _problem(meter.post(f"/api/meters/{meter_id}/energy", content=reading), 401,
                 "certificate_revoked")  # fmt: skip
